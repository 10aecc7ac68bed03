"""DPTrainer: the HF Trainer with TrainingArguments(deepspeed=...) trains by dist_dpc.initialize's DP
step. Its argument mapping against a direct initialize run with the same key, the ledger against
opacus' PRV, evaluation after training, nothing private logged, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DataCollatorWithPadding, TrainingArguments

import dist_dpc
from dist_dpc.models import ModelConfig, load_sequence_classifier, load_tokenizer
from dist_dpc.privacy.randomness import SecretKey
from tests.engine.dp_worker import logical_batch

N = 160
DS = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
      "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}


def tokenizer():
    return load_tokenizer(ModelConfig(name="tiny-bert"), log=None)


def model():
    return load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), num_labels=2, tokenizer=tokenizer(),
                                    seed=3)


def rows(n: int = N) -> list[dict]:
    batch = logical_batch(model().config.vocab_size, n, 9, 5)
    out = []
    for i in range(n):
        length = int(batch["attention_mask"][i].sum())  # unpadded: the Trainer's collator pads each micro-batch
        out.append({"input_ids": batch["input_ids"][i, :length].tolist(), "labels": int(batch["labels"][i])})
    return out


def same_ledger_emptied(source, target) -> None:
    """A ledger with ``source``'s id and no entries: a run in it under the same name and key draws the
    same noise and batches as the run recorded in ``source`` (each entry's streams derive from the key,
    the ledger id and the entry), which is what a side-by-side equivalence test needs."""
    data = json.loads(source.read_text())
    target.write_text(json.dumps({**data, "phases": {}}))


def arguments(tmp_path, **extra) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), deepspeed=DS, per_device_train_batch_size=4,
                gradient_accumulation_steps=4, num_train_epochs=2, learning_rate=2e-2, lr_scheduler_type="linear",
                warmup_steps=2, weight_decay=0.01, report_to=[], logging_steps=1, use_cpu=True)
    base.update(extra)
    return TrainingArguments(**base)


def test_dptrainer_trains_what_initialize_trains_and_records_it(tmp_path):
    from opacus.accountants import PRVAccountant

    key = SecretKey.from_seed(17)
    privacy = dist_dpc.PrivacyConfig(target_epsilon=5.0, max_grad_norm=0.5)
    trainer = dist_dpc.DPTrainer(model=model(), args=arguments(tmp_path), train_dataset=rows(), eval_dataset=rows(40),
                                 processing_class=tokenizer(), privacy=privacy, key=key,
                                 ledger=tmp_path / "ledger.json")
    out = trainer.train()
    steps = 2 * round(N / 16)  # 2 epochs at q = 4 x 4 x 1 / N
    assert out.global_step == steps and out.metrics["epsilon"] <= 5.0 * (1 + 1e-6)
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    (entry,) = ledger["phases"].values()
    (mechanism,) = entry["mechanisms"]
    assert entry["status"] == "completed" and mechanism["steps"] == steps and mechanism["sample_rate"] == 16 / N
    accountant = PRVAccountant()
    accountant.history = [(mechanism["noise_multiplier"], mechanism["sample_rate"], steps)]
    assert out.metrics["epsilon"] == pytest.approx(accountant.get_epsilon(delta=ledger["delta"], eps_error=0.01), abs=0.05)
    assert not any("loss" in record for record in trainer.state.log_history)  # exact batch statistics: never logged
    assert "eval_loss" in trainer.evaluate()
    with pytest.raises(ValueError, match="on the training set"):
        trainer.evaluate(trainer.train_dataset)
    trainer.save_model(str(tmp_path / "saved"))  # what push_to_hub writes too: the DP model with its lineage
    assert json.loads((tmp_path / "saved" / "privacy_lineage.json").read_text())["mechanisms"] == entry["mechanisms"]

    # The same run through dist_dpc.initialize, as the docstring maps the arguments.
    direct = model()
    config = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 2e-2, "weight_decay": 0.01, "betas": [0.9, 0.999],
                                                        "eps": 1e-8, "torch_adam": True}}}
    same_ledger_emptied(tmp_path / "ledger.json", tmp_path / "direct.json")
    engine, _, loader, _ = dist_dpc.initialize(
        model=direct, config=config, privacy=privacy, training_data=rows(), steps=steps, key=key,
        collate_fn=DataCollatorWithPadding(tokenizer()), ledger=tmp_path / "direct.json",
        lr_schedule=lambda s: (s + 1) / 3 if s < 2 else (steps - s) / (steps - 2))
    for batch in loader:
        engine.train_batch(batch)
    trained = dict(trainer.model.named_parameters())
    for name, p in direct.named_parameters():
        torch.testing.assert_close(trained[name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(trained[n], p) for n, p in model().named_parameters())


@pytest.mark.parametrize("change,message", [
    ({"deepspeed": None}, "set TrainingArguments\\(deepspeed="),
    ({"lr_scheduler_type": "cosine"}, "lr_scheduler_type='cosine'"),
    ({"deepspeed": {**DS, "gradient_clipping": 1.0}}, "gradient_clipping"),
    ({"deepspeed": {**DS, "scheduler": {"type": "WarmupLR"}}}, "\"scheduler\" block"),
    ({"deepspeed": {**DS, "train_batch_size": 64}}, "train_batch_size=64 but the TrainingArguments give 16"),
])
def test_refusals(tmp_path, change, message, monkeypatch):
    with pytest.raises(ValueError, match="DPTrainer needs ledger=<path>"):
        dist_dpc.DPTrainer(model=model(), args=arguments(tmp_path), train_dataset=rows(), processing_class=tokenizer())
    monkeypatch.setenv("WANDB_WATCH", "gradients")
    with pytest.raises(ValueError, match="histograms of the clipped gradient sums"):
        dist_dpc.DPTrainer(model=model(), args=arguments(tmp_path, report_to=["wandb"]), train_dataset=rows(),
                           processing_class=tokenizer(), ledger=tmp_path / "ledger.json")
    monkeypatch.delenv("WANDB_WATCH")
    with pytest.raises(ValueError, match=message):
        trainer = dist_dpc.DPTrainer(model=model(), args=arguments(tmp_path, **change), train_dataset=rows(),
                                     processing_class=tokenizer(), ledger=tmp_path / "ledger.json")
        trainer.train()
    ledger = tmp_path / "ledger.json"
    assert not ledger.exists() or json.loads(ledger.read_text())["phases"] == {}


def test_a_model_built_under_zero_init_trains_like_one_loaded_whole(tmp_path, request):
    """At ZeRO 3, transformers builds a model created after TrainingArguments(deepspeed=...) inside
    deepspeed.zero.Init: it is never whole on a rank. The DP step sees it already partitioned (its
    tensors empty placeholders) and must train exactly what the same model loaded whole trains."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from dist_dpc.engine import init_distributed

    init_distributed()
    request.addfinalizer(unset_hf_deepspeed_config)  # later tests in this process load models whole again
    base = tmp_path / "base"
    model().save_pretrained(base)
    zero3 = {**DS, "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 3}}
    trained = {}
    for mode in ("whole", "zero_init"):
        if mode == "whole":
            net = AutoModelForSequenceClassification.from_pretrained(base, use_kernels=False)
            whole_numel = sum(p.numel() for p in net.parameters())
        args = arguments(tmp_path / mode, deepspeed=zero3, num_train_epochs=1)
        if mode == "zero_init":  # created after the arguments: transformers partitions it while loading
            net = AutoModelForSequenceClassification.from_pretrained(base, use_kernels=False)
            assert all(hasattr(p, "ds_numel") and p.numel() == 0 for p in net.parameters())
            assert sum(p.ds_numel for p in net.parameters()) == whole_numel
        if mode == "zero_init":
            same_ledger_emptied(tmp_path / "whole.json", tmp_path / "zero_init.json")
        trainer = dist_dpc.DPTrainer(model=net, args=args, train_dataset=rows(), processing_class=tokenizer(),
                                     privacy=dist_dpc.PrivacyConfig(target_epsilon=5.0, public_model_dirs=[str(base)]),
                                     key=SecretKey.from_seed(3),
                                     ledger=tmp_path / f"{mode}.json")
        trainer.train()
        # The files, not from_pretrained: while ZeRO-3 arguments live, transformers would partition it again.
        # (Saved from a zero.Init model, transformers writes LayerNorm's legacy names gamma/beta, which
        # from_pretrained maps back.)
        trained[mode] = {n.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
                         for n, v in load_file(tmp_path / mode / "out" / "model.safetensors").items()}
        del args, trainer
    initial = load_file(base / "model.safetensors")
    assert any(not torch.equal(trained["whole"][n], initial[n]) for n in initial)
    for name, value in trained["whole"].items():
        torch.testing.assert_close(trained["zero_init"][name], value, rtol=1e-5, atol=1e-6, msg=name)
