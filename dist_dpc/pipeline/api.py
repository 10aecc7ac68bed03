"""``dist_dpc.initialize``: the DP step for a user's own DeepSpeed loop, in the shape of
``deepspeed.initialize``. (In the pipeline layer: it keeps the ledger and writes lineage as phases do.)

    engine, optimizer, loader, _ = dist_dpc.initialize(model=model, config="ds_config.json",
                                                       privacy=PrivacyConfig(target_epsilon=3),
                                                       training_data=train_set, epochs=3)
    for batch in loader:              # one logical batch per step, drawn by Poisson sampling
        stats = engine.train_batch(batch)
    engine.finish()                   # the ledger now counts the steps taken

What changes against a plain DeepSpeed loop, and why:
- ``train_batch_size`` of the DeepSpeed JSON is the *expected* logical batch B (each example joins a
  step with probability q = B / N); ``train_micro_batch_size_per_gpu`` the fixed micro-batch. The
  number of micro-batches of a step varies, so the engine marks the accumulation boundary itself.
- One call per logical step (``engine.train_batch``), like DeepSpeed's pipeline engine: per-sample
  clipping needs every micro-batch's per-sample losses (``loss_fn``), and the noise is added once per
  step in the optimizer's pre-hook. ``engine.backward``/``engine.step`` are refused, not emulated.
- The planned length (``steps`` or ``epochs``) is part of the privacy plan: sigma is calibrated for
  it, and the run is refused past it.
- Every run records into a privacy ledger (``ledger=``, default ./privacy_ledger.json) before the first
  private read; a rerun appends an attempt and composes with the earlier ones, never resets them.

Everything the pipeline's phases refuse is refused here with the same messages: it is the same
engine (DPEngine), the same DeepSpeed checks (build_ds_config) and the same budget (PhaseBudget).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dist_dpc.engine.distributed import init_distributed
from dist_dpc.engine.dp_engine import DPEngine, StepStats
from dist_dpc.engine.ds_config import build_ds_config, read_ds_config
from dist_dpc.engine.losses import classification_losses, next_token_losses
from dist_dpc.engine.partitioned import gathered_state_dict
from dist_dpc.pipeline.trainer import _from_rank0
from dist_dpc.privacy.accounting import check_delta, delta_default
from dist_dpc.privacy.budget import PhaseBudget
from dist_dpc.privacy.config import PrivacyConfig
from dist_dpc.privacy.ledger import PrivacyLedger
from dist_dpc.privacy.randomness import SecretKey, broadcast_key
from dist_dpc.privacy.sampling import make_sampler

NOT_INPUTS = ("labels", "sample_mask")


def default_loss(forward, batch: dict) -> torch.Tensor:
    """Per-sample cross-entropy for the two model shapes of the Hugging Face convention: logits (B, K)
    of a sequence classifier against ``labels`` (B,), or logits (B, T, V) of a causal LM against
    ``labels`` (B, T) = the input ids with -100 where no loss is wanted (shifted here, as the model
    would). Anything else: pass ``loss_fn(forward, batch) -> (B,)``."""
    logits = forward(**{k: v for k, v in batch.items() if k not in NOT_INPUTS}).logits
    labels = batch["labels"]
    if logits.dim() == 2:
        return classification_losses(logits, labels)
    if logits.dim() == 3 and labels.dim() == 2:
        return next_token_losses(logits, labels)
    raise ValueError(f"dist_dpc.initialize: the default loss handles logits of shape (B, K) or (B, T, V) with labels "
                     f"(B,) or (B, T); got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: pass "
                     "loss_fn=lambda forward, batch: <per-sample losses, shape (B,)>")


@dataclass
class LogicalBatch:
    """One DP step's examples on this rank: fixed-shape micro-batches (rows with sample_mask 0 are
    padding and carry no gradient) and the logical batch size over all ranks."""

    micro_batches: list[dict]
    logical_batch_size: int
    step: int


class PoissonBatches:
    """The training data loader: yields the planned steps' logical batches, starting at the engine's
    step (a resumed engine continues). All ranks draw the same batch from the shared secret key and
    keep their share, so every rank runs the same number of micro-steps without communication."""

    def __init__(self, dataset, sampler, collate_fn: Callable, micro_batch_size: int, steps: int,
                 start: Callable[[], int]):
        self.dataset, self.sampler, self.collate_fn = dataset, sampler, collate_fn
        self.micro_batch_size, self.steps, self._start = micro_batch_size, steps, start

    def __len__(self) -> int:
        return self.steps - self._start()

    def __iter__(self):
        for step in range(self._start(), self.steps):
            plan = self.sampler.plan(step)
            yield LogicalBatch([self._micro(idx) for idx in plan.micro_batches], plan.logical_batch_size, step)

    def _micro(self, indices: list[int]) -> dict:
        # Padding rows (sample_mask 0) give every micro-batch the same shape. They are collated from an
        # example (for its shapes), then zeroed: constants that depend on no private data; their loss
        # is multiplied by 0 and the engine refuses a padding row with a gradient (a loss mixing rows).
        rows = [self.dataset[i] for i in indices]
        fill = rows[0] if rows else self.dataset[0]
        batch = dict(self.collate_fn(rows + [fill] * (self.micro_batch_size - len(rows))))
        for value in batch.values():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == self.micro_batch_size:
                value[len(rows):] = 0
        if "sample_mask" in batch:
            raise ValueError("dist_dpc.initialize: the collated batch has a 'sample_mask' key, which the DP loader "
                             "sets itself (1 for real rows, 0 for padding): rename it in collate_fn")
        mask = torch.zeros(self.micro_batch_size)
        mask[:len(rows)] = 1
        batch["sample_mask"] = mask
        return batch


class PrivateEngine:
    """What ``initialize`` returns: the DP step over a DeepSpeed engine (``.ds``), and its ledger entry."""

    def __init__(self, dp: DPEngine, budget: PhaseBudget | None, ledger: PrivacyLedger | None):
        self.dp, self.budget, self.ledger = dp, budget, ledger
        self.finished = False
        self.loaded_steps = 0  # the step a checkpoint loaded before training brought
        self.run_lock = None   # rank 0: held until finish() (initialize's _hold_run_lock)
        self.loaded = False    # a checkpoint was loaded (at most one, before any step)
        self.run_number = 0    # this run's number in its ledger entry (its noise and batches are keyed by it)

    # -- training -------------------------------------------------------------------------------
    def train_batch(self, batch: LogicalBatch) -> StepStats | None:
        """One DP-SGD step on one logical batch from the loader initialize returned. Returns the step's
        exact statistics only where they may be released (privacy off, or
        privacy.release_exact_statistics for debugging); None otherwise."""
        if self.finished:
            raise RuntimeError("engine.finish() was called: its steps are in the ledger; train with a new initialize")
        if not isinstance(batch, LogicalBatch):
            raise TypeError("engine.train_batch takes a LogicalBatch from the loader dist_dpc.initialize returned "
                            f"(got {type(batch).__name__}): its batches are Poisson samples with padding masks, "
                            "which the accounting assumes")
        if self.dp.broken is not None:
            raise RuntimeError(f"this engine stopped: {self.dp.broken}; what it started is counted at finish()")
        if batch.step != self.dp.steps_done:
            raise ValueError(f"engine.train_batch: the batch was drawn for step {batch.step}, the engine is at step "
                             f"{self.dp.steps_done}: iterate the loader once per step, without skipping or replaying")
        stats = self.dp.train_step(batch.micro_batches, batch.logical_batch_size)
        return stats if self.dp.privacy.releases_training_statistics else None

    def backward(self, *args, **kwargs):
        raise RuntimeError("a DP step is engine.train_batch(batch): per-sample clipping needs the per-sample losses of "
                           "every micro-batch, and the noise goes on once per logical batch. engine.backward/step of "
                           "a plain DeepSpeed loop would bypass both")

    step = backward

    def finish(self) -> float | None:
        """Record the steps taken as released (the reservation is replaced by what ran) and complete the
        ledger entry; returns the ledger's total epsilon. Call it before publishing the model."""
        if self.budget is not None and not self.finished:
            # Every step started counts, a failed one included; a checkpoint loaded before training
            # brings the steps it was written at (spent by the run that wrote them, counted there too).
            self.budget.release(self.budget.dp_sgd(self.dp.steps_started + self.loaded_steps))
            self.budget.complete()
        self.finished = True
        _release_run_lock(self.run_lock)
        self.run_lock = None
        return self.epsilon()

    # -- what a DeepSpeed engine offers -------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.dp.ds(*args, **kwargs)

    @property
    def module(self) -> torch.nn.Module:
        return self.dp.module

    @property
    def steps_done(self) -> int:
        return self.dp.steps_done

    @property
    def noise_multiplier(self) -> float:
        return self.dp.noise_multiplier

    def train(self, mode: bool = True):
        self.dp.ds.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def epsilon(self) -> float | None:
        """The ledger's total epsilon (everything it holds, this run's whole reservation while it runs)."""
        return self.ledger.total_epsilon() if self.ledger is not None else None

    def save_checkpoint(self, directory: str | Path, tag: str, client_state: dict | None = None) -> None:
        """DeepSpeed's checkpoint, plus ``<directory>/<tag>/dist_dpc_entry.json``: the ledger entry and
        plan it belongs to, which ``initialize(resume_from=...)`` checks before continuing that entry."""
        if self.budget is not None and self.budget.writer:  # checkpoints may leave the machine: an output too
            self.ledger.note_output(self.budget.entry, self.dp.steps_started + self.loaded_steps)
        self.dp.save_checkpoint(directory, tag, client_state)
        if self.budget is not None and self.dp.world.is_main:
            import json

            entry = {"ledger_id": self.ledger.ledger_id, "entry": self.budget.entry, "step": self.dp.steps_done,
                     "noise_multiplier": self.budget.noise_multiplier, "sample_rate": self.budget.sample_rate,
                     "planned_steps": self.budget.steps, "max_grad_norm": self.dp.privacy.max_grad_norm,
                     "clipping": self.dp.privacy.clipping, "run": self.run_number}
            (Path(directory) / tag / ENTRY_FILE).write_text(json.dumps(entry, indent=1))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def load_checkpoint(self, directory: str | Path, tag: str | None = None) -> dict:
        """Only before the first step: loading later would rewind the step count over steps whose
        results may already be out (the ledger must count what ran, not what the weights show)."""
        if self.dp.steps_started:
            raise RuntimeError(f"engine.load_checkpoint after {self.dp.steps_started} steps of this engine: load before "
                               "training (a new initialize), never to rewind one")
        if self.loaded:
            raise RuntimeError("engine.load_checkpoint: this engine already loaded a checkpoint (or resumed its entry "
                               "from one); a second load could rewind past what was written since: use a new initialize")
        state = self.dp.load_checkpoint(directory, tag)
        self.loaded_steps = self.dp.steps_done
        self.loaded = True
        return state

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        """The model as a Hugging Face directory (ZeRO-3 partitions gathered), with its privacy lineage:
        what the ledger holds now (this run's whole reservation until finish()), so a dist-dpc phase
        that later uses the directory as a teacher or source composes with its cost. Every rank calls it."""
        import shutil

        from dist_dpc.pipeline.lineage import LINEAGE_FILE, write_lineage

        directory = Path(directory)
        module = self.dp.module
        if self.budget is not None and self.budget.writer:
            # Before anything is written: a resume may not restart this entry from an earlier checkpoint.
            self.ledger.note_output(self.budget.entry, self.dp.steps_started + self.loaded_steps)
        # One tensor gathered at a time (ZeRO 3) into rank 0's CPU copy: never the whole model on a device.
        state = gathered_state_dict(module, keep=self.dp.world.is_main)
        if self.dp.world.is_main:
            # Written beside the target and renamed into place: never new weights with an old lineage.
            tmp = directory.with_name(directory.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            module.save_pretrained(str(tmp), state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            write_lineage(tmp, self.ledger, phase=self.budget.entry if self.budget else "train")
            # Into place file by file, the lineage first: a crash in between leaves the new (larger)
            # cost beside the old weights, never the old cost beside new weights. Other files stay.
            directory.mkdir(parents=True, exist_ok=True)
            files = sorted(tmp.iterdir(), key=lambda path: path.name != LINEAGE_FILE)
            for path in files:
                os.replace(path, directory / path.name)
            tmp.rmdir()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


def initialize(*, model: torch.nn.Module, config: dict | str | Path, privacy: PrivacyConfig | None = None,
               training_data: Sequence, dataset_size: int | None = None, collate_fn: Callable | None = None,
               loss_fn: Callable | None = None, steps: int | None = None, epochs: float | None = None,
               ledger: str | Path, name: str = "train", key: SecretKey | None = None,
               lr_schedule: Callable[[int], float] | None = None, model_parameters=None, optimizer=None,
               lr_scheduler=None, args=None, resume_from: str | Path | None = None,
               resume_tag: str | None = None) -> tuple[PrivateEngine, torch.optim.Optimizer, PoissonBatches, None]:
    """DP-SGD for a user's loop, returning (engine, optimizer, training_dataloader, lr_scheduler) as
    ``deepspeed.initialize`` does (the scheduler is None: DeepSpeed's "scheduler" block or
    ``lr_schedule(step) -> factor`` set the learning rate).

    config: the DeepSpeed JSON (dict or path). train_batch_size = expected logical batch B,
        train_micro_batch_size_per_gpu = the micro-batch (or derived from gradient_accumulation_steps);
        its "optimizer" block is the optimizer; settings that touch gradients are refused.
    privacy: PrivacyConfig (target_epsilon or noise_multiplier, max_grad_norm, clipping, delta...).
    training_data: indexable examples; collate_fn(list of examples) -> dict of tensors (default
        torch's default_collate). dataset_size: N if given, must equal len(training_data).
    loss_fn(forward, batch) -> per-sample losses (B,) (default: default_loss).
    steps / epochs: the planned length (one of them); sigma is calibrated for it.
    ledger: the privacy ledger of this private data set: every run on the same data must name the same
        file (outside the model directories), or their spend does not compose. name: this run's entry
        (a rerun after finish() appends name#2 ...; while an entry runs, another run needs another name).
    key: the secret key of noise and sampling (default: drawn from the OS on rank 0, never written).
    model_parameters: if given, only these parameters train (the others are frozen, never noised).
    resume_from: a checkpoint directory engine.save_checkpoint wrote in a run of this entry that stopped
        before finish() (killed, preempted): this run continues that entry (same sigma, same plan, no
        second reservation) from the checkpoint (``resume_tag``, default DeepSpeed's ``latest``), and
        finish() counts the entry's steps once. Refused if the entry finished, if the plan differs, or
        if that run saved a model or a checkpoint after the checkpoint's step.
    """
    if optimizer is not None or lr_scheduler is not None:
        raise ValueError("dist_dpc.initialize: pass the optimizer and scheduler in the DeepSpeed config's \"optimizer\" "
                         "and \"scheduler\" blocks, not as objects: the DP noise goes on in a pre-hook of the optimizer "
                         "DeepSpeed builds and steps")
    privacy = privacy if privacy is not None else PrivacyConfig()
    if not name or "#" in name:
        raise ValueError(f"dist_dpc.initialize: name={name!r} must be non-empty and without '#' (the ledger numbers "
                         "attempts with it)")
    n = len(training_data)
    if dataset_size is not None and dataset_size != n:
        raise ValueError(f"dist_dpc.initialize: dataset_size={dataset_size} but training_data has {n} examples: "
                         "Poisson sampling draws from training_data, so N is its length (drop dataset_size)")
    world = init_distributed()
    ds_user, batch_size, micro = _batch_sizes(config, world.world_size)
    if not 1 <= batch_size < n:
        raise ValueError(f"config train_batch_size={batch_size} must be in [1, N={n}): it is the expected logical "
                         "batch of Poisson sampling, q = train_batch_size / N < 1")
    if "optimizer" not in ds_user:
        raise ValueError("dist_dpc.initialize: the DeepSpeed config has no \"optimizer\" block: add one, e.g. "
                         "\"optimizer\": {\"type\": \"AdamW\", \"params\": {\"lr\": 1e-3}}")
    if model_parameters is not None:
        keep = {id(p) for p in model_parameters}
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
    ds_config = build_ds_config(ds_user, micro_batch_size=micro, world_size=world.world_size, zero_stage=None,
                                lr=0.0, weight_decay=0.0, optimizer="adamw", bf16=False, dp_enabled=privacy.enabled)
    if lr_schedule is not None and "scheduler" in ds_config:
        raise ValueError("dist_dpc.initialize: the DeepSpeed config has a \"scheduler\" block and lr_schedule is set: "
                         "keep one")
    DPEngine.check_settings(model, ds_config, privacy)  # unsupported or tied layers: refused before any spend
    q = batch_size / n
    planned = planned_steps(steps, epochs, q)
    key = broadcast_key(key if key is not None else (SecretKey.generate() if world.is_main else None),
                        world.world_size)
    budget, book = None, None
    if not privacy.enabled:
        warnings.warn("dist_dpc.initialize with privacy.enabled=false: NO differential privacy, nothing is clipped, "
                      "noised or recorded in a ledger", stacklevel=2)
    delta = privacy.delta if privacy.delta is not None else delta_default(n)
    check_delta(delta, n)
    run_lock = None
    if privacy.enabled:
        book = PrivacyLedger(ledger, privacy.target_epsilon, delta, n, accountant=privacy.accountant)
        run_lock = _hold_run_lock(book, name, world, resuming=resume_from is not None)
    try:
        _import_starting_model(model, privacy, book, world, name)  # before the reservation: it composes with it
        resume = _resume_point(resume_from, resume_tag, book, name, world, sample_rate=q, steps=planned,
                               privacy=privacy) if resume_from is not None else None
        if privacy.enabled:
            budget, ledger_id, run_number = _reserve(book, name, world, sample_rate=q, steps=planned, privacy=privacy,
                                                     batch_size=batch_size, resume=resume)
            # Keyed by the ledger, the entry and the run within it: a rerun (name#2), another name or a
            # resume never replays an earlier run's noise or batches, even with the same key= (the same
            # draw under two settings would expose the clipped sum).
            key = key.derive("ledger", ledger_id or "", "entry", budget.entry, "run", run_number)
            privacy = dataclasses.replace(privacy, noise_multiplier=budget.noise_multiplier, delta=book.delta)
        dp = DPEngine(model, ds_config, privacy, dataset_size=n, expected_batch_size=batch_size, planned_steps=planned,
                      loss_fn=loss_fn or default_loss, world=world, key=key.derive("dp-sgd"),
                      poisson_sampling=privacy.sampling == "poisson", prior=budget.prior() if budget else (),
                      phase=budget.entry if budget else name, lr_schedule=lr_schedule)
        sampler = make_sampler(privacy.sampling, dataset_size=n, expected_batch_size=batch_size, micro_batch_size=micro,
                               rank=world.rank, world_size=world.world_size, key=key.derive("sampling"))
        loader = PoissonBatches(training_data, sampler, collate_fn or torch.utils.data.default_collate, micro, planned,
                                start=lambda: dp.steps_done)
        engine = PrivateEngine(dp, budget, book)
        engine.run_lock = run_lock
        engine.run_number = run_number if privacy.enabled else 0
        if resume is not None:
            engine.load_checkpoint(resume_from, resume["tag"])  # the only load this engine allows
            if dp.steps_done != resume["step"]:
                raise RuntimeError(f"dist_dpc.initialize: {resume_from} tag {resume['tag']} loaded step {dp.steps_done}, "
                                   f"its {ENTRY_FILE} says {resume['step']}: the checkpoint is inconsistent")
        return engine, dp.optimizer, loader, None
    except BaseException:
        _release_run_lock(run_lock)  # a refused or failed start leaves no lock behind
        raise


ENTRY_FILE = "dist_dpc_entry.json"
_RUN_LOCKS: dict[str, Any] = {}


def _hold_run_lock(book: PrivacyLedger, name: str, world, *, resuming: bool):
    """Rank 0 holds ``<ledger>.run-<hash of name>.lock`` from initialize to finish() (the OS drops it
    when the process dies): a run that resumes an entry proves so that the run it continues is gone,
    since two live runs in one entry would be counted as one trajectory."""
    import fcntl

    import hashlib

    # The name hashed: any name (a '/' included) gives a file beside the ledger.
    path = f"{book.path}.run-{hashlib.sha256(name.encode()).hexdigest()[:16]}.lock"
    outcome, handle = None, None
    if world.is_main:
        if path in _RUN_LOCKS:
            outcome = "is still running in this process" if resuming else None  # else: the ledger's fresh check
        else:
            try:
                handle = open(path, "a")
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                _RUN_LOCKS[path] = handle
            except BlockingIOError:
                handle.close()
                handle, outcome = None, "is still running in another process"
            except OSError as err:
                handle, outcome = None, f"cannot be locked ({err})"
    outcome = _from_rank0(outcome)
    if outcome is not None:
        hint = ("let it finish or stop it first" if resuming else
                f"let it finish, or start this run under another name (e.g. name='{name}-2')")
        raise ValueError(f"dist_dpc.initialize: the run of entry {name!r} in {book.path} {outcome} (lock {path}): {hint}")
    return handle


def _release_run_lock(handle) -> None:
    if handle is None:
        return
    for path, held in list(_RUN_LOCKS.items()):
        if held is handle:
            del _RUN_LOCKS[path]
    handle.close()


def _resume_point(directory: str | Path, tag: str | None, book: PrivacyLedger | None, name: str, world, *,
                  sample_rate: float, steps: int, privacy: PrivacyConfig) -> dict:
    """What ``resume_from`` may continue (checked on rank 0, its verdict on every rank): the checkpoint's
    entry is ``name``'s latest attempt in this very ledger, still running, with this plan, and its run
    published nothing after the checkpoint's step."""
    import json

    def check() -> dict:
        directory_ = Path(directory)
        tag_ = tag
        if tag_ is None:
            latest = directory_ / "latest"
            if not latest.is_file():
                raise FileNotFoundError(f"resume_from={str(directory)!r}: no 'latest' file; pass resume_tag=")
            tag_ = latest.read_text().strip()
        record = directory_ / tag_ / ENTRY_FILE
        if not record.is_file():
            raise FileNotFoundError(f"resume_from={str(directory)!r}, tag {tag_!r}: no {ENTRY_FILE} (a checkpoint of "
                                    "engine.save_checkpoint in a private run): start a new entry instead")
        saved = json.loads(record.read_text())
        if book is None:
            raise ValueError("resume_from continues a ledger entry; with privacy.enabled=false there is none")
        if saved["ledger_id"] != book.ledger_id:
            raise ValueError(f"resume_from: the checkpoint belongs to another ledger ({saved['ledger_id']}), not "
                             f"{book.path} ({book.ledger_id}): resume with the ledger that run used")
        latest_entry = book.latest_attempt(name)
        if saved["entry"] != latest_entry:
            raise ValueError(f"resume_from: the checkpoint belongs to entry {saved['entry']!r}, but name={name!r}'s "
                             f"latest entry is {latest_entry!r}: pass the name that run used")
        entry = book.entry(saved["entry"])
        if entry["status"] != "running":
            raise ValueError(f"resume_from: entry {saved['entry']!r} is {entry['status']} (finish() was called): its "
                             "steps are counted; train on with a new entry (load_checkpoint without resume_from)")
        if saved["sample_rate"] != sample_rate or saved["planned_steps"] != steps:
            raise ValueError(f"resume_from: that run planned {saved['planned_steps']} steps at q={saved['sample_rate']},"
                             f" this one {steps} at q={sample_rate}: resume with the same data, batch size and steps")
        reserved = (entry.get("reservation") or {}).get("noise_multiplier")
        if reserved != saved["noise_multiplier"] or privacy.noise_multiplier not in (None, saved["noise_multiplier"]):
            raise ValueError(f"resume_from: that run used sigma {saved['noise_multiplier']} (the entry reserves "
                             f"{reserved}), this one asks for {privacy.noise_multiplier}: resume with the privacy "
                             "settings of that run (leave noise_multiplier unset to take the entry's)")
        if "run" not in saved:
            raise ValueError(f"resume_from: {record} was written by an older dist-dpc (no run number, C or clipping "
                             "mode): it cannot be checked, so start a new entry (load_checkpoint without resume_from)")
        for field in ("max_grad_norm", "clipping"):
            if saved.get(field) != getattr(privacy, field):
                raise ValueError(f"resume_from: that run used {field}={saved.get(field)!r}, this one "
                                 f"{getattr(privacy, field)!r}: resume with the privacy settings of that run")
        if int(entry.get("output_at_step", 0)) > int(saved["step"]):
            raise ValueError(f"resume_from: that run wrote a model or checkpoint after {entry['output_at_step']} steps, "
                             f"later than this checkpoint (step {saved['step']}): resuming here would count those steps "
                             "once for two different trajectories. Resume from its latest checkpoint (if no model was "
                             "saved after it), or start a new entry")
        return {**saved, "tag": tag_}

    outcome, error = None, None
    if world.is_main:
        try:
            outcome = ["ok", check()]
        except (OSError, ValueError, KeyError) as err:
            outcome, error = ["refused", f"{type(err).__name__}: {err}"], err
    outcome = _from_rank0(outcome)
    if error is not None:
        raise error
    if outcome[0] != "ok":
        raise ValueError(outcome[1])
    return outcome[1]


def _import_starting_model(model: torch.nn.Module, privacy: PrivacyConfig, book: PrivacyLedger | None, world,
                           name: str) -> None:
    """A model loaded with ``from_pretrained`` from a directory an earlier DP run wrote carries that
    run's privacy lineage: its cost goes into this ledger first (as the pipeline's phases do), so the
    new run is calibrated against it and the total is honest. A model trained WITHOUT DP on private
    data is refused; a local directory of unknown origin is refused unless privacy.public_model_dirs
    lists it; hub names and models built from a config are public."""
    from types import SimpleNamespace

    from dist_dpc.pipeline.lineage import import_lineage

    source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source or not isinstance(source, (str, Path)):
        return
    ctx = SimpleNamespace(cfg=SimpleNamespace(privacy=privacy), ledger=book, world=world, phase=name,
                          is_main=world.is_main)
    import_lineage(ctx, source, role="model (its name_or_path)")


def _batch_sizes(config, world_size: int) -> tuple[dict[str, Any], int, int]:
    ds = dict(read_ds_config(config))
    batch = ds.pop("train_batch_size", None)
    micro = ds.pop("train_micro_batch_size_per_gpu", None)
    accumulation = ds.pop("gradient_accumulation_steps", None)
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"config train_batch_size={batch!r}: set it to the expected logical batch size B of a DP step "
                         "(an integer; each example joins a step with probability B / N)")
    if micro is None and isinstance(accumulation, int) and accumulation >= 1:
        micro = max(1, batch // (accumulation * world_size))
    if not isinstance(micro, int) or micro < 1:
        raise ValueError(f"config train_micro_batch_size_per_gpu={micro!r}: set the micro-batch each rank computes at "
                         "once (an integer >= 1); the number of micro-batches per step follows the Poisson draw")
    return ds, batch, micro


def planned_steps(steps: int | None, epochs: float | None, q: float) -> int:
    if (steps is None) == (epochs is None):
        raise ValueError("dist_dpc.initialize: give the planned training length as steps=... or epochs=... (one of "
                         "them): sigma is calibrated for it and the engine stops there")
    planned = steps if steps is not None else math.ceil(epochs * max(1, round(1 / q)))
    if not isinstance(planned, int) or planned < 1:
        raise ValueError(f"dist_dpc.initialize: steps={steps!r}, epochs={epochs!r} plan {planned!r} steps; must be >= 1")
    return planned


def _reserve(ledger: PrivacyLedger, name: str, world, *, sample_rate: float, steps: int, privacy: PrivacyConfig,
             batch_size: int, resume: dict | None = None) -> tuple[PhaseBudget, str]:
    """Rank 0 reserves under the ledger's lock; the others join its entry (as the pipeline's phases do).
    ``resume``: continue that running entry (its reservation, hence its sigma) instead of a new one."""
    outcome, error = None, None
    if world.is_main:
        try:
            budget = PhaseBudget.reserve(ledger, name, sample_rate=sample_rate, steps=steps, fresh=resume is None,
                                         target_epsilon=privacy.target_epsilon, noise_multiplier=privacy.noise_multiplier,
                                         expected_batch_size=batch_size, max_effective_noise=privacy.max_effective_noise)
            if resume is not None and (budget.entry != resume["entry"]
                                       or budget.noise_multiplier != resume["noise_multiplier"]):
                raise ValueError(f"resume_from: the ledger gave entry {budget.entry!r} at sigma {budget.noise_multiplier},"
                                 f" the checkpoint was made in {resume['entry']!r} at sigma {resume['noise_multiplier']}:"
                                 " resume with the privacy settings of that run")
            run_number = ledger.start_run(budget.entry)
            if resume is not None and run_number <= int(resume["run"]):
                # The ledger lost its run count (restored from a copy, or rewritten by an older dist-dpc):
                # this run's number would key the killed run's noise and batches again.
                raise ValueError(f"resume_from: the ledger numbers this run {run_number}, but the checkpoint was written "
                                 f"by run {resume['run']} of entry {budget.entry!r}: the ledger's run count was reset, "
                                 "so fresh noise is not guaranteed. Start a new entry instead")
            outcome = ["ok", budget.entry, budget.noise_multiplier, ledger.ledger_id, run_number]
        except Exception as err:  # every rank stops with rank 0's reason
            outcome, error = ["refused", str(err)], err
    outcome = _from_rank0(outcome)  # sigma and the entry from rank 0, not from each rank's view of the file
    if error is not None:
        raise error
    if outcome[0] != "ok":
        raise ValueError(outcome[1])
    _, entry, sigma, ledger_id, run_number = outcome
    return PhaseBudget(ledger, entry, name, float(sigma), sample_rate, steps, writer=world.is_main), ledger_id, run_number
