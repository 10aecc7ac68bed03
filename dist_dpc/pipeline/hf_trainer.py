"""``DPTrainer``: the Hugging Face ``Trainer`` with DP-SGD, for users who train with
``TrainingArguments(deepspeed=...)``.

    trainer = DPTrainer(model=model, args=TrainingArguments(output_dir="out", deepspeed="ds_config.json",
                                                            per_device_train_batch_size=16,
                                                            gradient_accumulation_steps=8, num_train_epochs=3),
                        train_dataset=train, eval_dataset=dev, processing_class=tokenizer,
                        privacy=PrivacyConfig(target_epsilon=3), ledger="sst2_privacy_ledger.json")
    trainer.train(); trainer.evaluate()

``train`` runs ``dist_dpc.initialize`` on the Trainer's model, data and collator, with the DeepSpeed
JSON the arguments name; everything else stays the Trainer's (evaluation, prediction, callbacks'
logging of what is not private). How the arguments map:
- per_device_train_batch_size -> the micro-batch; per_device_train_batch_size x gradient_accumulation_steps
  x world size -> the *expected* logical batch B of Poisson sampling (q = B / N);
- num_train_epochs or max_steps -> the planned length sigma is calibrated for;
- learning_rate, weight_decay, adam_beta1/2, adam_epsilon -> the AdamW block when the JSON has none
  (or fill its "auto" values); lr_scheduler_type constant/linear and warmup_steps -> the schedule;
- gradient_clipping "auto" -> 0 (DP-SGD clips per sample to privacy.max_grad_norm instead; a clip of
  the noisy sum would be a second, unaccounted change of the gradient: a number there is refused);
- bf16 "auto" -> args.bf16; zero_optimization's "auto" bucket sizes -> from the model's hidden size, as the
  Trainer sizes them (dist_dpc.engine.ds_config.fill_width_autos); its other "auto" entries -> DeepSpeed's defaults.
The training loss is never logged: it is an exact statistic of the private batch. ``ledger=`` names
the privacy ledger of the private data set (the same file for every run on it); the model is saved
to output_dir with its privacy lineage at the end of ``train``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path

from transformers import Trainer
from transformers.trainer_utils import TrainOutput

from dist_dpc.engine.ds_config import read_ds_config
from dist_dpc.engine.lr_schedule import make_lr_schedule
from dist_dpc.pipeline.api import initialize, planned_steps
from dist_dpc.privacy.config import PrivacyConfig


class DPTrainer(Trainer):
    def __init__(self, *args, privacy: PrivacyConfig | None = None, ledger: str | Path | None = None,
                 name: str = "train", key=None, **kwargs):
        """``ledger``: the privacy ledger of the private data set; ``name``: this run's entry in it.
        ``key``: a dist_dpc SecretKey for noise and sampling (default: drawn from the OS on rank 0,
        never written). Only for tests and reproductions: whoever knows it can remove the noise."""
        super().__init__(*args, **kwargs)
        self.key, self.name = key, name
        report_to = self.args.report_to if isinstance(self.args.report_to, (list, tuple)) else [self.args.report_to]
        if "wandb" in report_to and os.environ.get("WANDB_WATCH", "false").lower() in ("gradients", "all"):
            raise ValueError(f"DPTrainer with report_to wandb and WANDB_WATCH={os.environ['WANDB_WATCH']}: W&B would "
                             "upload histograms of the clipped gradient sums before the noise. Set WANDB_WATCH=false "
                             "(or parameters: the noisy weights are released anyway)")
        if not self.args.deepspeed:
            raise ValueError("DPTrainer runs DP-SGD under DeepSpeed: set TrainingArguments(deepspeed=<JSON path or "
                             "dict>), e.g. deepspeed={\"zero_optimization\": {\"stage\": 2}}")
        self.privacy = privacy if privacy is not None else PrivacyConfig()
        if ledger is None:
            raise ValueError("DPTrainer needs ledger=<path>: the privacy ledger of this private data set, the same file "
                             "for every run on it (outside output_dir), so that their spend composes")
        self.ledger_path = Path(ledger)
        self.dp_engine = None
        # The DP engine is built in train() by dist_dpc.initialize, never by the Trainer's own DeepSpeed
        # path; evaluation and prediction run the module (at ZeRO 3 the engine's hooks gather its layers).
        self.is_deepspeed_enabled = False

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs) -> TrainOutput:
        if resume_from_checkpoint or trial is not None:
            raise ValueError("DPTrainer.train: resume_from_checkpoint and hyper-parameter trials are not supported "
                             "(a trial on private data is unaccounted tuning: see `dpc tune`)")
        args, start = self.args, time.time()
        data = self.train_dataset
        if args.remove_unused_columns and hasattr(data, "column_names"):
            data = self._remove_unused_columns(data, description="training")
        world = max(1, args.world_size)
        ds = deepspeed_json(args, world)
        steps = args.max_steps if args.max_steps and args.max_steps > 0 else None
        epochs = None if steps is not None else args.num_train_epochs
        planned = planned_steps(steps, epochs, ds["train_batch_size"] / len(data))
        engine, _, loader, _ = initialize(
            model=self.model, config=ds, privacy=self.privacy, training_data=data, collate_fn=self.data_collator,
            steps=planned, ledger=self.ledger_path, lr_schedule=_schedule(args, planned), key=self.key, name=self.name)
        self.dp_engine = engine
        self.model_wrapped = engine.module  # evaluation runs the module (ZeRO-3 hooks gather its layers)
        self.state.max_steps = planned
        for batch in loader:
            engine.train_batch(batch)  # its statistics are exact: never logged
            self.state.global_step = engine.steps_done
            self.state.epoch = engine.steps_done / planned * (epochs or planned * ds["train_batch_size"] / len(data))
            every = args.logging_steps if args.logging_steps >= 1 else math.ceil(args.logging_steps * planned)
            if every and engine.steps_done % int(every) == 0:
                self.log({"learning_rate": engine.dp.optimizer.param_groups[0]["lr"], "dp_steps": engine.steps_done})
        epsilon = engine.finish()
        engine.save_pretrained(args.output_dir, self.processing_class)
        metrics = {"train_runtime": time.time() - start, "epsilon": epsilon, "delta": engine.ledger.delta
                   if engine.ledger is not None else None, "dp_steps": engine.steps_done}
        self.log(metrics)
        return TrainOutput(engine.steps_done, math.nan, metrics)


    # -- what the Trainer would otherwise release without the DP step ------------------------------
    def evaluate(self, eval_dataset=None, *args, **kwargs):
        self._refuse_training_set(eval_dataset, "evaluate")
        return super().evaluate(eval_dataset, *args, **kwargs)

    def predict(self, test_dataset, *args, **kwargs):
        self._refuse_training_set(test_dataset, "predict")
        return super().predict(test_dataset, *args, **kwargs)

    def _refuse_training_set(self, dataset, what: str) -> None:
        if dataset is not None and dataset is self.train_dataset:
            raise ValueError(f"DPTrainer.{what} on the training set: its loss and predictions are exact statistics of "
                             "the private data, with no noise and no ledger entry. Evaluate on a held-out split")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """After train(): the DP engine's model (ZeRO-3 partitions gathered) with its privacy lineage;
        push_to_hub goes through here too. Before train(): the model as given (nothing private in it)."""
        if self.dp_engine is None:
            return super().save_model(output_dir, _internal_call)
        self.dp_engine.save_pretrained(output_dir or self.args.output_dir, self.processing_class)


def deepspeed_json(args, world: int) -> dict:
    """The DeepSpeed JSON of ``args.deepspeed`` with the Trainer's "auto" values filled for DP-SGD."""
    ds = copy.deepcopy(read_ds_config(args.deepspeed))
    micro = args.per_device_train_batch_size
    expected = micro * max(1, args.gradient_accumulation_steps) * world
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("train_batch_size", expected)):
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ValueError(f"the DeepSpeed config sets {key}={ds[key]} but the TrainingArguments give {value}: "
                             "set it to \"auto\" (or to the same value)")
    ds.pop("gradient_accumulation_steps", None)  # the Poisson draw decides the micro-steps of each step
    if ds.get("gradient_clipping") == "auto":
        ds["gradient_clipping"] = 0.0
    if isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled") == "auto":
        ds["bf16"]["enabled"] = bool(args.bf16)
    if isinstance(ds.get("fp16"), dict) and ds["fp16"].get("enabled") == "auto":
        ds["fp16"]["enabled"] = bool(args.fp16)
    adamw = {"lr": args.learning_rate, "weight_decay": args.weight_decay, "betas": [args.adam_beta1, args.adam_beta2],
             "eps": args.adam_epsilon, "torch_adam": True}
    if "optimizer" not in ds:
        ds["optimizer"] = {"type": "AdamW", "params": adamw}
    else:
        params = ds["optimizer"].setdefault("params", {})
        for key, value in list(params.items()):
            if value == "auto":
                params[key] = adamw.get(key, value)
    if "scheduler" in ds:
        raise ValueError("the DeepSpeed config has a \"scheduler\" block: DPTrainer takes the schedule from "
                         "TrainingArguments (lr_scheduler_type constant or linear, warmup_steps); remove the block")
    return ds


def _schedule(args, planned: int):
    kind = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if kind not in ("constant", "linear", "constant_with_warmup"):
        raise ValueError(f"TrainingArguments.lr_scheduler_type={kind!r}: DPTrainer supports constant, "
                         "constant_with_warmup and linear (the learning rate is a function of the DP step alone)")
    warmup = args.warmup_steps or 0
    if 0 < warmup < 1:  # a fraction of the planned steps (transformers 5)
        warmup = math.ceil(warmup * planned)
    elif not warmup and getattr(args, "warmup_ratio", None):
        warmup = math.ceil(args.warmup_ratio * planned)
    return make_lr_schedule("linear" if kind == "linear" else "constant", planned, int(warmup))
