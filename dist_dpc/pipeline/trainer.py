"""The shared training loop: data -> model -> DP engine -> steps -> evaluation -> results.

Every phase that reads the private data (train, teacher, distill, prune) runs its DP-SGD through
``train_dp``; the DP step itself lives in dist_dpc.engine.dp_engine. What a phase may spend comes
from the run tree's privacy ledger (``phase_privacy``), never from the phase alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dist_dpc.compress.layer_files import write_kept_layers
from dist_dpc.data import PAD_MULTIPLE
from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
from dist_dpc.engine.lr_schedule import make_lr_schedule
from dist_dpc.engine.partitioned import gathered_state_dict
from dist_dpc.engine.distributed import WorldInfo
from dist_dpc.engine.ds_config import config_width, config_zero_stage, fill_width_autos, has_width_autos
from dist_dpc.models import load_tokenizer
from dist_dpc.models.loading import DEBUG_MODELS, check_max_length
from dist_dpc.pipeline.checkpoints import Checkpoints
from dist_dpc.pipeline.preemption import PreemptionGuard
from dist_dpc.pipeline.config import Config, user_config
from dist_dpc.pipeline.run_dir import RunDir
from dist_dpc.privacy.accounting import Mechanism, check_delta, delta_default
from dist_dpc.privacy.config import PrivacyConfig
from dist_dpc.privacy.budget import PhaseBudget
from dist_dpc.privacy.ledger import PrivacyBudgetExceeded, PrivacyLedger
from dist_dpc.privacy.randomness import SecretKey
from dist_dpc.privacy.sampling import make_sampler
from dist_dpc.tasks import Task, make_task
from dist_dpc.utils.config_loader import dump_yaml, to_dict
from dist_dpc.utils.logging import log, warn_loudly
from dist_dpc.utils.progress import Progress
from dist_dpc.utils.tracking import Tracker, make_tracker

LEDGER_FILE = "privacy_ledger.json"
POST_PROCESSING = ("eval", "export", "generate")


@dataclass
class PhaseContext:
    """What every phase of a run tree shares: config, task, ranks, data, tokenizer, ledger, noise key."""
    cfg: Config
    task: Task                # model.task: data, model, loss and metric (dist_dpc.tasks)
    world: WorldInfo
    run: RunDir
    phase: str
    directory: Path           # this phase's directory (the run root for the single-phase `train`)
    tokenizer: object
    train_set: object
    eval_sets: dict
    num_labels: int | None    # classifier outputs (None: no classifier, e.g. causal_lm)
    label_names: list[str] | None  # the task's public schema (config or published), never the data's
    key: SecretKey            # this phase's noise and sampling key (never written anywhere)
    sampling: str
    ledger: PrivacyLedger | None
    budget: PhaseBudget | None = None  # this attempt's account in the ledger, once reserved
    holdout_set: object = None  # private validation split (data.holdout_fraction), for `dpc tune` only
    public_train_size: int | None = None  # with a holdout: N(1 - fraction), the public stand-in for len(train_set)
    public_holdout_size: int | None = None
    opened: float = field(default_factory=time.perf_counter)  # for results' phase_seconds

    @property
    def train_size(self) -> int:
        """The training-set size everything released is computed from (q, steps per epoch): the
        part's true size, except with a holdout, whose split makes it depend on the data."""
        return self.public_train_size or len(self.train_set)

    @property
    def is_main(self) -> bool:
        return self.world.is_main


def root_of(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


def phase_directory(cfg: Config, phase: str) -> Path:
    return root_of(cfg) if phase == "train" else root_of(cfg) / phase


def phase_key(root: SecretKey, phase: str) -> SecretKey:
    """Each phase draws its own noise and batches: reusing one phase's Gaussian draws in another
    would correlate mechanisms that the accountant composes as independent."""
    return root.derive("phase", phase)


def open_phase(cfg: Config, phase: str, *, load_data: bool = True, size_only: bool = False) -> PhaseContext:
    """``size_only``: the private data is read for its public size N alone (nothing tokenized, cached or
    kept: `dpc audit`'s white-box run)."""
    world = init_distributed()
    directory = phase_directory(cfg, phase)
    # Post-processing phases are redone freely; a finished training phase is never overwritten.
    # The config the user gave is what the tree saves and compares on resume (a phase may run with
    # values it set itself: tuned ones, `dpc tune`'s holdout).
    # generate checks its own directory (it never writes results.json), so it runs in a `dpc train` tree.
    run = RunDir.prepare(user_config(cfg), world,
                         directory if phase not in POST_PROCESSING or phase == "generate" else None)
    # Every rank has compared with the saved config before rank 0 writes it (a rank still reading
    # while it is rewritten would see a partial file and refuse the run).
    torch.distributed.barrier()
    if world.is_main:
        dump_yaml(user_config(cfg), run.path / "config.yaml")
        directory.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()

    objective = make_task(cfg.model, cfg.data)
    tokenizer = load_tokenizer(cfg.model, log=lambda message: log(world, message))
    task = objective.load_data()
    # With a holdout the training part's size depends on the data: its public stand-in is logged.
    log(world, f"[{phase}] {objective.name} data: {task.source}; train {task.public_train_size or len(task.train)} examples, "
               + ", ".join(f"{k} {len(v)}" for k, v in task.eval.items()))
    num_labels = objective.num_labels(task, cfg.model.num_labels)
    if load_data:
        warn_exact_statistics(cfg.privacy, world)
    for split in [task.train, *task.eval.values(), *([task.holdout] if task.holdout else [])]:
        objective.check_split(split, num_labels)
    cache = run.path / "cache"
    if size_only:
        train_set, eval_sets, holdout_set = None, {}, None
        task.public_train_size = task.public_train_size or len(task.train)
    else:
        train_set = objective.tokenize(task.train, tokenizer, cache, train=True) if load_data else None
        eval_sets = {k: objective.tokenize(v, tokenizer, cache, train=False) for k, v in task.eval.items()}
        holdout_set = (objective.tokenize(task.holdout, tokenizer, cache, train=False)
                       if load_data and task.holdout is not None else None)
    privacy = cfg.privacy
    sampling = privacy.sampling if privacy.enabled else "shuffle"
    ledger = None
    if privacy.enabled:
        n = task.dataset_size or len(task.train)  # the whole private set, a holdout included
        delta = privacy.delta if privacy.delta is not None else delta_default(n)
        check_delta(delta, n)  # before head_init or anything else reads the data
        ledger = PrivacyLedger(run.path / LEDGER_FILE, privacy.target_epsilon, delta, n, privacy.accountant)
    return PhaseContext(cfg=cfg, task=objective, world=world, run=run, phase=phase, directory=directory, tokenizer=tokenizer,
                        train_set=train_set, eval_sets=eval_sets, num_labels=num_labels,
                        label_names=task.label_names if num_labels and task.num_labels == num_labels else None,
                        key=phase_key(run.noise_key(privacy), phase), sampling=sampling, ledger=ledger,
                        holdout_set=holdout_set, public_train_size=task.public_train_size,
                        public_holdout_size=task.public_holdout_size)


def warn_exact_statistics(privacy: PrivacyConfig, world) -> None:
    if privacy.enabled and privacy.release_exact_statistics:
        warn_loudly(world, "privacy.release_exact_statistics=true: the exact train loss, clipped fractions, "
                           "gradient-norm quantiles, batch sizes and token counts are logged WITHOUT differential "
                           "privacy; the DP guarantee does not cover them. For debugging only: do not publish this "
                           "run's logs, W&B run, metrics.jsonl or results.json")


def local_device() -> torch.device:
    """This rank's accelerator (the one init_distributed selected), else the CPU: where a phase puts
    the models it runs outside the DeepSpeed engine (a frozen teacher, head_init, eval)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def planned_steps(epochs: float, max_steps: int | None, steps_per_epoch: int) -> int:
    steps = max(1, math.ceil(epochs * steps_per_epoch))
    return min(steps, max_steps) if max_steps else steps


def steps_per_epoch(ctx: PhaseContext) -> int:
    return math.ceil(ctx.train_size / ctx.cfg.train.batch_size)


def sample_rate(ctx: PhaseContext) -> float:
    return ctx.cfg.train.batch_size / ctx.train_size


def phase_privacy(ctx: PhaseContext, steps: int, fixed: tuple[Mechanism, ...] = ()) -> PrivacyConfig:
    """Reserve this phase's spend in the run tree's ledger before any private data is read: ``steps``
    DP-SGD steps (probe and fine-tuning) at one sigma, calibrated (or checked) so that everything
    recorded so far, plus ``fixed`` (mechanisms of a set sigma, e.g. head_init's DP mean), plus these
    steps stays within the phase's cumulative share of privacy.target_epsilon. The reservation is
    made by rank 0 under the ledger's lock (PhaseBudget.reserve); the other ranks join it. Sets
    ``ctx.budget``, through which every release of the phase is then recorded, and keys the phase's
    randomness by its attempt (a re-run never replays an earlier attempt's noise)."""
    privacy = ctx.cfg.privacy
    batch, n = ctx.cfg.train.batch_size, ctx.train_size
    if batch >= n:
        raise ValueError(f"train.batch_size={batch} is not below the {n} training examples: Poisson sampling needs "
                         f"q = batch_size / N < 1 (and DP gains from q well below 1). Use train.batch_size <= {max(1, n // 4)} "
                         "or more data")
    if ctx.ledger is None:
        return privacy
    q = sample_rate(ctx)
    reserve_budget(ctx, sample_rate=q, steps=steps, fixed=fixed, noise_multiplier=privacy.noise_multiplier,
                   expected_batch_size=ctx.cfg.train.batch_size)
    # delta is the ledger's (from the whole private set's N): never recomputed from a part's realised size.
    return dataclasses.replace(privacy, noise_multiplier=ctx.budget.noise_multiplier,
                               target_epsilon=phase_target(ctx), delta=ctx.ledger.delta)


def phase_target(ctx: PhaseContext) -> float | None:
    """The cumulative epsilon the tree may reach once this phase is done (its budget_split share and
    every share before it)."""
    target = ctx.cfg.privacy.target_epsilon
    return None if target is None else target * ctx.cfg.pipeline.cumulative_share(ctx.phase)


def reserve_budget(ctx: PhaseContext, *, sample_rate: float, steps: int, fixed: tuple[Mechanism, ...] = (),
                   noise_multiplier: float | None = None, expected_batch_size: float | None = None) -> PhaseBudget:
    """The reservation itself (phase_privacy for DP-SGD phases; the histogram phase: q 1, one step):
    rank 0 reserves under the ledger's lock, the other ranks join; sets ``ctx.budget`` and keys the
    phase's randomness by its attempt."""
    privacy = ctx.cfg.privacy
    target = phase_target(ctx)
    outcome = None
    if ctx.is_main:
        try:
            _hold_phase_lock(ctx)
            budget = PhaseBudget.reserve(ctx.ledger, ctx.phase, sample_rate=sample_rate, steps=steps, fixed=fixed,
                                         target_epsilon=target, noise_multiplier=noise_multiplier,
                                         expected_batch_size=expected_batch_size,
                                         max_effective_noise=privacy.max_effective_noise)
            outcome = ("ok", budget.entry)
        except (ValueError, PrivacyBudgetExceeded, PhaseRunningError) as err:
            outcome = ("refused", type(err).__name__, str(err))
    outcome = _from_rank0(outcome)
    if outcome[0] != "ok":  # every rank stops with rank 0's reason
        kinds = {"PrivacyBudgetExceeded": PrivacyBudgetExceeded, "PhaseRunningError": PhaseRunningError}
        raise kinds.get(outcome[1], ValueError)(outcome[2])
    ctx.budget = PhaseBudget.join(ctx.ledger, ctx.phase, entry=outcome[1])
    ctx.budget.writer = ctx.is_main
    ctx.key = ctx.key.derive("attempt", ctx.budget.attempt)
    _clear_stale_attempt(ctx)
    total = ctx.ledger.total_epsilon()
    log(ctx.world, f"[{ctx.phase}] privacy budget ({ctx.budget.entry}): sigma={ctx.budget.noise_multiplier:.4f}, "
                   f"q={sample_rate:.5f}, {steps} steps; run total with this reservation epsilon={total:.3f}"
                   + (f" (phase target {target:.3f} of {privacy.target_epsilon:g})" if target is not None else ""))
    return ctx.budget


class PhaseRunningError(RuntimeError):
    """The same phase of this run tree is running in another process."""


_PHASE_LOCKS: dict[str, object] = {}  # held until the process exits


def _hold_phase_lock(ctx: PhaseContext) -> None:
    """One process at a time per phase of a run tree: a second launch would join the running
    attempt with its own noise key, and its releases would mix with the first one's."""
    import fcntl

    path = str(ctx.run.path / f".{ctx.phase}.lock")
    if path in _PHASE_LOCKS:
        return
    handle = open(path, "a")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise PhaseRunningError(f"phase {ctx.phase!r} of {ctx.run.path} is running in another process (it holds "
                                f"{path}); wait for it to finish, or cancel that job, before starting it again")
    _PHASE_LOCKS[path] = handle


def _from_rank0(value):
    box = [value]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


ATTEMPT_FILE = "attempt.json"


def _clear_stale_attempt(ctx: PhaseContext) -> None:
    """A new attempt of a phase (after a completed one, run.overwrite=true) must not resume from the
    old attempt's checkpoints or reuse its head_init: drop those intermediate files. A resumed
    attempt (same ledger entry) keeps them."""
    marker = ctx.directory / ATTEMPT_FILE
    if ctx.is_main:
        ctx.directory.mkdir(parents=True, exist_ok=True)
        previous = json.loads(marker.read_text()).get("entry") if marker.is_file() else None
        if previous is not None and previous != ctx.budget.entry:
            import shutil

            for stale in [ctx.directory / "checkpoints", ctx.directory / "head_init.pt",
                          *ctx.directory.glob("round*")]:
                if stale.is_dir():
                    shutil.rmtree(stale)
                elif stale.exists():
                    stale.unlink()
            log(ctx.world, f"[{ctx.phase}] new attempt {ctx.budget.entry}: {previous}'s checkpoints and head_init "
                           "are not reused")
        ctx.run.write_json(marker, {"entry": ctx.budget.entry})
    torch.distributed.barrier()


def check_before_spending(ctx: PhaseContext, model: torch.nn.Module, *, steps: int, lr: float | None = None) -> None:
    """What train_dp refuses on the settings and the model alone (data.max_length beyond the model's
    positions, the DeepSpeed config, a clashing scheduler, layers the DP engine cannot clip),
    checked before the phase reserves budget and before head_init reads the private data: a refusal
    then spends nothing."""
    cfg = ctx.cfg
    check_max_length(model.config, cfg.data.max_length, f"the {ctx.phase} phase's model", pad_multiple=PAD_MULTIPLE)
    ds_config = _phase_ds_config(cfg, ctx.world, lr, cfg.privacy.enabled)
    _lr_schedule(cfg, ds_config, steps)
    DPEngine.check_settings(model, ds_config, cfg.privacy)


def write_layers(ctx: PhaseContext, source: Path, target: Path, keep: list[int], record: Path) -> None:
    """``target``: the saved model ``source`` with only the layers ``keep`` (write_kept_layers), written
    by the main rank while the others wait; the choice is recorded in ``record``."""

    def write():
        write_kept_layers(source, target, keep)
        ctx.run.write_json(record, {"source": str(source), "kept": keep})

    on_rank0(ctx, write, f"writing the layers {keep} of {source} to {target}")


def on_rank0(ctx: PhaseContext, work: Callable, what: str):
    """``work()`` on the main rank while the others wait; its result on every rank, or its error
    raised on every rank (none is left waiting in a collective for a rank that gave up)."""
    result, failure = None, None
    if ctx.is_main:
        try:
            result = work()
        except (OSError, ValueError, KeyError) as err:
            failure = f"{type(err).__name__}: {err}"
    result, failure = _from_rank0((result, failure))
    if failure:
        raise RuntimeError(f"{ctx.phase}: {what} failed on rank 0: {failure}")
    return result


def phase_zero_stage(ctx: PhaseContext) -> int:
    """The ZeRO stage the phase's engine will run at (train.zero_stage, or the DeepSpeed JSON's)."""
    return config_zero_stage(_phase_ds_config(ctx.cfg, ctx.world, None, ctx.cfg.privacy.enabled))


def frozen_for_phase(ctx: PhaseContext, model: torch.nn.Module) -> torch.nn.Module:
    """A frozen model the phase only runs forward (DPKD's teacher), placed like the model that trains
    (engine.frozen.place_frozen): partitioned over the ranks at ZeRO 3, else whole on this rank's
    device; in bf16 when the phase trains in bf16 (train.bf16 or the DeepSpeed JSON's)."""
    from dist_dpc.engine.frozen import place_frozen

    return place_frozen(model, _phase_ds_config(ctx.cfg, ctx.world, None, ctx.cfg.privacy.enabled), local_device())


def load_for_phase(ctx: PhaseContext, load: Callable[[], torch.nn.Module], what: str = "model",
                   name: str | None = None) -> torch.nn.Module:
    """``load()`` (a from_pretrained / from_config inside) placed for this phase: at ZeRO 3 transformers
    builds the model inside ``deepspeed.zero.Init`` (its HfDeepSpeedConfig seam, as the HF Trainer
    does), so each rank only ever holds 1/world of its weights, even while loading; at ZeRO 0-2 whole.
    The setting is removed again on return: later loads (eval, export, a CPU copy to merge adapters)
    build whole models. A debug model (``name`` in DEBUG_MODELS) is built whole: it is tiny, and under
    zero.Init transformers would initialise it on rank 0 in another order, so the same seed would give
    other weights at ZeRO 3 than at ZeRO 0-2."""
    ds_config = _phase_ds_config(ctx.cfg, ctx.world, None, ctx.cfg.privacy.enabled)
    if config_zero_stage(ds_config) != 3 or name in DEBUG_MODELS:
        return load()
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from dist_dpc.engine.frozen import local_numel
    from dist_dpc.engine.partitioned import full_numel, is_partitioned

    ds_config = config_for_loading(ds_config, name)
    hf_setting = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference to it
    try:
        model = load()
    finally:
        unset_hf_deepspeed_config()
        del hf_setting
    params = list(model.parameters())
    partitioned = [p for p in params if is_partitioned(p)]
    log(ctx.world, f"[{ctx.phase}] {what} built partitioned over {ctx.world.world_size} ranks (zero.Init): rank 0 "
                   f"holds {local_numel(model):,} of its {sum(full_numel(p) for p in params):,} parameters "
                   f"({len(partitioned)} of {len(params)} tensors partitioned)")
    return model


def config_for_loading(ds_config: dict, name: str | None) -> dict:
    """The phase's DeepSpeed JSON for zero.Init, its "auto" bucket sizes filled from the saved config of
    ``name`` as the engine will fill them from the model: zero.Init marks which parameters stay
    gathered (persistent) by the threshold it reads, which would otherwise be DeepSpeed's default
    (1e5 elements) rather than the engine's 10 x width. Without a readable config, unchanged (the
    load itself then says what is missing)."""
    if name is None or not has_width_autos(ds_config):
        return ds_config
    from transformers import AutoConfig

    from dist_dpc.models.loading import resolve_name

    try:
        width = config_width(AutoConfig.from_pretrained(resolve_name(name)))
    except (OSError, ValueError):
        return ds_config
    return fill_width_autos(ds_config, width) if width is not None else ds_config


def _phase_ds_config(cfg: Config, world: WorldInfo, lr: float | None, dp_enabled: bool) -> dict:
    return build_ds_config(cfg.train.deepspeed_config, micro_batch_size=cfg.train.micro_batch_size,
                           world_size=world.world_size, zero_stage=cfg.train.zero_stage, lr=lr or cfg.train.lr,
                           weight_decay=cfg.train.weight_decay, optimizer=cfg.train.optimizer,
                           bf16=cfg.train.bf16, dp_enabled=dp_enabled, momentum=cfg.train.momentum)


def _lr_schedule(cfg: Config, ds_config: dict, steps: int):
    schedule = make_lr_schedule(cfg.train.lr_schedule, steps, cfg.train.warmup_steps)
    if schedule is not None and "scheduler" in ds_config:
        raise ValueError(f"train.deepspeed_config={cfg.train.deepspeed_config!r} has a scheduler block and "
                         f"train.lr_schedule={cfg.train.lr_schedule!r}, train.warmup_steps={cfg.train.warmup_steps} "
                         "set another: keep one (remove the block, or set lr_schedule=constant and warmup_steps=0)")
    return schedule


def train_dp(ctx: PhaseContext, model: torch.nn.Module, *, directory: Path, steps: int, privacy: PrivacyConfig,
             tracker: Tracker, loss_fn=None, lr: float | None = None,
             key: SecretKey | None = None, step_offset: int = 0, setup: Callable[[DPEngine], None] | None = None,
             desc: str | None = None) -> DPEngine:
    """DP-SGD on the private training set for ``steps`` logical steps, resumable from ``directory``.
    ``key`` (default: the phase's) keys the Poisson batches and the noise; in secure mode a resumed
    phase has a fresh key, so its remaining steps draw fresh batches and noise (the accountant
    continues from the checkpoint, so epsilon is unaffected)."""
    cfg, world = ctx.cfg, ctx.world
    loss_fn = loss_fn or ctx.task.loss
    key = ctx.key if key is None else key
    sampler = make_sampler(ctx.sampling, dataset_size=len(ctx.train_set), expected_batch_size=cfg.train.batch_size,
                           sample_rate=sample_rate(ctx),
                           micro_batch_size=cfg.train.micro_batch_size, rank=world.rank,
                           world_size=world.world_size, key=key.derive("sampling"))
    ds_config = _phase_ds_config(cfg, world, lr, privacy.enabled)
    checkpoints = Checkpoints(directory / "checkpoints", keep=cfg.train.keep_checkpoints, world=world)
    ds_config, universal = checkpoints.resume_config(ds_config)  # another world size: re-partitioned
    schedule = _lr_schedule(cfg, ds_config, steps)
    # Everything this run composes with: the other ledger entries, then what this attempt released
    # so far (head_init, earlier prune rounds). The ledger adds it up; no phase does.
    prior = ctx.budget.prior() if ctx.budget is not None else ()
    # The engine sees only public sizes (with a holdout, the part's realised size depends on the data).
    engine = DPEngine(model, ds_config, privacy, dataset_size=ctx.train_size, sample_rate=sample_rate(ctx),
                      expected_batch_size=cfg.train.batch_size, planned_steps=steps, loss_fn=loss_fn, world=world,
                      key=key.derive("dp-sgd"), poisson_sampling=(ctx.sampling == "poisson"), prior=prior, phase=ctx.phase,
                      lr_schedule=schedule)
    if setup is not None:
        setup(engine)
    if privacy.enabled:
        log(world, f"[{desc or ctx.phase}] DP-SGD: sigma={engine.noise_multiplier:.4f} q={engine.sample_rate:.5f} "
                   f"steps={steps} delta={engine.delta:.3g} C={privacy.max_grad_norm} clipping={privacy.clipping} "
                   f"sampling={ctx.sampling} accountant={privacy.accountant} "
                   f"zero_stage={engine.ds.zero_optimization_stage()} world={world.world_size}")

    if world.is_main:
        directory.mkdir(parents=True, exist_ok=True)
    # One metrics file per phase (rounds of a phase append to it at their global step).
    metrics_log = MetricsLog(ctx.directory / "metrics.jsonl", enabled=world.is_main)
    if checkpoints.latest() is not None:
        checkpoints.load(engine, universal=universal)
        spent = f", epsilon so far {engine.epsilon():.3f}" if privacy.enabled else ""
        log(world, f"[{desc or ctx.phase}] resumed from {checkpoints.latest()} at step {engine.steps_done}/{steps}{spent}")
    metrics_log.truncate_after(step_offset + engine.steps_done)
    start = time.perf_counter()
    progress = Progress(world, total=steps, initial=engine.steps_done, desc=desc or ctx.phase)
    guard = PreemptionGuard(world, engine.ds.device)
    try:
        _steps(ctx, engine, sampler, tracker, metrics_log, checkpoints, progress, guard, steps, step_offset, start)
    finally:
        guard.restore()
    progress.close()
    engine.train_seconds = time.perf_counter() - start
    if ctx.budget is not None:  # recorded before the caller writes the model anywhere
        ctx.budget.release(ctx.budget.dp_sgd(engine.steps_done))
    return engine


def micro_batch(ctx: PhaseContext, rows: list[int], pad_id: int) -> dict:
    """The training examples ``rows`` as one fixed-shape micro-batch (padding rows: sample_mask 0),
    with each sample's row in the training set as ``example_index`` (0 on padding rows): how a loss
    reads a per-example table computed once, as DistillationLoss does its teacher's logits."""
    batch = ctx.task.collate([ctx.train_set[i] for i in rows], pad_id, num_rows=ctx.cfg.train.micro_batch_size)
    index = torch.zeros(batch["sample_mask"].shape[0], dtype=torch.long)
    index[:len(rows)] = torch.as_tensor(rows, dtype=torch.long)
    batch["example_index"] = index
    return batch


def _steps(ctx, engine, sampler, tracker, metrics_log, checkpoints, progress, guard, steps, step_offset, start):
    cfg, pad_id = ctx.cfg, ctx.tokenizer.pad_token_id
    for step in range(engine.steps_done, steps):
        plan = sampler.plan(step)
        micro = [micro_batch(ctx, idx, pad_id) for idx in plan.micro_batches]
        step_start = time.perf_counter()
        stats = engine.train_step(micro, plan.logical_batch_size)
        seconds = time.perf_counter() - step_start
        progress.update()
        metrics = {}
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == steps:
            metrics.update(step_metrics(engine, stats, micro, seconds))
        saved = False
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < steps:
            # Eval metrics release the parameters after this step. Checkpoint first: a resume
            # (with a fresh key in secure mode) must never redraw a step whose result is out.
            if ctx.budget is not None:
                checkpoints.save(engine)
                saved = True
            metrics.update(eval_metrics(engine, ctx))  # the phase's end is evaluated after the loop
        if metrics:
            tracker.log(metrics, step=step_offset + step + 1)
            metrics_log.write(step_offset + step + 1, metrics)
            progress.report(step + 1, metrics, time.perf_counter() - start)
        if step + 1 < steps and guard.requested():
            tag = checkpoints.save(engine)
            progress.close()
            tracker.finish()  # flush the W&B run; the resumed job continues the same run id
            guard.stop(f"{checkpoints.directory / tag}")
        if (cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0 and step + 1 < steps
                and not saved):
            checkpoints.save(engine)


class MetricsLog:
    """Per-step metrics as JSON lines next to the phase (what `dpc report` plots without W&B)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        # A resumed run repeats the steps after its checkpoint: drop their earlier lines.
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: dict) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": step, **metrics}, default=float) + "\n")


def step_metrics(engine: DPEngine, stats, micro: list[dict], seconds: float) -> dict:
    """What a DP run is watched by: the privacy spent, the schedule and throughput. Under DP only
    public quantities; the exact statistics of the private batch only where they may be released
    (privacy off, or privacy.release_exact_statistics)."""
    out = {"train/lr": engine.ds.get_lr()[0], "train/expected_batch_size": engine.expected_batch_size,
           # From the expected batch size: the realised one is private under Poisson sampling.
           "perf/samples_per_s": engine.expected_batch_size / seconds, "perf/peak_memory_mb": peak_memory_mb()}
    if engine.clipper is not None:
        out.update({"privacy/epsilon": engine.epsilon(), "privacy/epsilon_" + other_accountant(engine): engine.epsilon(other_accountant(engine)),
                    "privacy/noise_multiplier": engine.noise_multiplier, "privacy/sample_rate": engine.sample_rate})
    if engine.privacy.releases_training_statistics:
        out.update(exact_step_statistics(engine, stats, micro, seconds))
    return out


def exact_step_statistics(engine: DPEngine, stats, micro: list[dict], seconds: float) -> dict:
    """Exact statistics of this step's private batch (not noised, not accounted): every one of them
    depends on which examples were sampled, so under DP they are released only by the debug switch."""
    tokens = sum(int((m["attention_mask"].sum(1) * m["sample_mask"]).sum()) for m in micro)
    out = {"train/loss": stats.loss, "train/batch_size": stats.logical_batch_size,
           "perf/realised_samples_per_s": stats.logical_batch_size / seconds,
           "perf/tokens_per_s_rank0": tokens / seconds}
    if engine.clipper is not None:
        out["privacy/clipped_fraction"] = stats.clipped_fraction
        out.update({f"privacy/grad_norm_{k}": v for k, v in stats.grad_norm_quantiles.items()})
    return out


def eval_metrics(engine: DPEngine, ctx: PhaseContext) -> dict:
    """eval/<split>/loss and the task's metric during training: the evaluation split is not the
    protected set, so these are how learning is watched under DP. Every rank evaluates (ZeRO-3 needs all)."""
    return {f"eval/{split}/{key}": m[key] for split, m in evaluate_engine(engine, ctx).items()
            for key in ctx.task.watched}


def other_accountant(engine: DPEngine) -> str:
    return "rdp" if engine.privacy.accountant == "prv" else "prv"


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_parameters(module: torch.nn.Module):
    """Parameters with their full sizes (ZeRO-3 keeps the numel of a partitioned one in ds_numel)."""
    for p in module.parameters():
        yield torch.empty(getattr(p, "ds_numel", p.numel()), device="meta")


def evaluate_engine(engine: DPEngine, ctx: PhaseContext) -> dict:
    return {name: ctx.task.evaluate(engine.ds, data, ctx.tokenizer.pad_token_id, ctx.cfg.train.eval_batch_size,
                                    engine.ds.device)
            for name, data in ctx.eval_sets.items()}


def gathered(engine: DPEngine):
    """Context manager: the engine's whole model on every rank (ZeRO-3's partitions gathered; a no-op
    at ZeRO 0-2, where every rank holds it whole)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                             enabled=engine.ds.zero_optimization_stage() == 3)


def save_model(ctx: PhaseContext, engine: DPEngine, directory: Path) -> None:
    """Hugging Face directory of the trained model (gathered from ZeRO-3 partitions if needed), with
    its privacy lineage (what the ledger holds now: wherever the directory goes, its cost goes too).
    DP-LoRA: the adapters merged into the weights (a plain directory), and the adapter alone in
    ``adapter/`` (peft's format: PeftModel.from_pretrained(base, directory / "adapter")). Written
    next to the target and renamed into place: a crash never leaves half a model."""
    import shutil

    from dist_dpc.pipeline.lineage import write_lineage

    tokenizer, world, module = ctx.tokenizer, ctx.world, engine.module
    # One tensor gathered at a time (ZeRO 3), copied to rank 0's CPU: never the whole model on a device.
    state = gathered_state_dict(module, keep=world.is_main)
    if world.is_main:
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if is_peft(module):
            # A CPU copy of the same architecture holds the gathered weights; merging it leaves the
            # engine's (possibly partitioned) module untouched.
            copy = ctx.task.load_model(ctx.cfg.model, tokenizer, num_labels=ctx.num_labels,
                                       label_names=ctx.label_names, seed=ctx.cfg.run.seed)
            copy.load_state_dict(state)
            copy.save_pretrained(str(tmp / "adapter"))
            plain = copy.merge_and_unload()
            plain.save_pretrained(str(tmp), state_dict={k: v.detach().clone() for k, v in plain.state_dict().items()})
        else:
            module.save_pretrained(str(tmp), state_dict=state)
        tokenizer.save_pretrained(str(tmp))
        write_lineage(tmp, ctx.ledger, phase=ctx.phase)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    torch.distributed.barrier()


def is_peft(module: torch.nn.Module) -> bool:
    return callable(getattr(module, "get_base_model", None)) and hasattr(module, "merge_and_unload")


def phase_results(ctx: PhaseContext, engine: DPEngine, metrics: dict, steps: int, **extra) -> dict:
    privacy = ctx.cfg.privacy
    private = privacy.enabled
    return {
        "phase": ctx.phase,
        "task": ctx.task.name,
        "metrics": metrics,
        "steps": steps,
        "private": private,
        "epsilon": engine.epsilon() if private else None,
        "epsilon_rdp": engine.epsilon(other_accountant(engine)) if private else None,
        "delta": engine.delta if private else None,
        "noise_multiplier": engine.noise_multiplier,
        "sample_rate": engine.sample_rate,
        "accountant": privacy.accountant,
        "sampling": ctx.sampling,
        "randomness": privacy.randomness,
        "dataset_size": ctx.train_size,  # public: with a holdout, its stand-in
        "train_seconds": getattr(engine, "train_seconds", None),  # the DP-SGD steps (a prune phase: its last round's)
        "phase_seconds": time.perf_counter() - ctx.opened,  # the whole phase (head_init, passes, every round)
        "parameters": sum(p.numel() for p in model_parameters(engine.module)),
        **exact_phase_statistics(engine, privacy),
        **extra,
    }


def exact_phase_statistics(engine: DPEngine, privacy: PrivacyConfig) -> dict:
    """What results.json holds only where exact training statistics may be released: the ghost/
    direct norm method counts (chosen per micro-batch from its realised padded length, so they
    depend on which examples were sampled), and the mark of a DP run that released such numbers."""
    if not privacy.releases_training_statistics:
        return {}
    out = {"norm_methods": engine.clipper.method_summary() if engine.clipper else {}}
    if privacy.enabled:
        out["statistics_released_without_dp"] = True
    return out


def finish_phase(ctx: PhaseContext, tracker: Tracker, results: dict, model_dir: Path | None) -> None:
    """Ledger (completed), W&B summary/table/artifact, results.json, and the printed summary."""
    if ctx.budget is not None:
        # The attempt now counts what it released (DP mean, probe, DP-SGD steps, per round); the
        # epsilon reported is the ledger's, which also holds what was recorded since the phase began.
        results["ledger_entry"] = ctx.budget.entry
        results["mechanisms"] = [m.to_dict() for m in ctx.budget.complete()]
        results["epsilon"] = ctx.ledger.total_epsilon()
        results["epsilon_rdp"] = ctx.ledger.total_epsilon("rdp" if ctx.ledger.accountant == "prv" else "prv")
        results["delta"] = ctx.ledger.delta
    flat = {f"eval/{split}/{k}": v for split, m in results["metrics"].items() for k, v in m.items()}
    flat["eval/parameters"] = results.get("parameters")
    if "nonzero_parameters" in results:
        flat["eval/nonzero_parameters"] = results["nonzero_parameters"]
        flat["eval/sparsity"] = 1 - results["nonzero_parameters"] / results["parameters"]
    tracker.log(flat, step=results.get("global_steps", results["steps"]))
    if results["private"]:
        tracker.summary({"final_epsilon": results["epsilon"], "final_epsilon_rdp": results["epsilon_rdp"],
                         "delta": results["delta"], "noise_multiplier": results["noise_multiplier"],
                         "sample_rate": results["sample_rate"],
                         "statistics_released_without_dp": results.get("statistics_released_without_dp", False),
                         "randomness": results.get("randomness")})
        tracker.table("privacy_ledger", ["phase", "status", "noise_multiplier", "sample_rate", "steps"],
                      [[name, entry["status"], m.get("noise_multiplier"), m.get("sample_rate"),
                        m.get("steps", 1)]
                       for name, entry in ctx.ledger.phases().items() for m in entry["mechanisms"]])
    if model_dir is not None:
        tracker.artifact(model_dir, name=f"{ctx.cfg.run.name}-{ctx.phase}-model", kind="model",
                         metadata={"epsilon": results["epsilon"], "delta": results["delta"],
                                   "private": results["private"], "accountant": results["accountant"],
                                   "sampling": results["sampling"], "phase": ctx.phase})
    if ctx.is_main:
        if ctx.ledger is not None:
            results["ledger_total_epsilon"] = ctx.ledger.total_epsilon()
        ctx.run.write_json(ctx.directory / "results.json", results)
        summary(ctx.world, results)
    tracker.finish()
    torch.distributed.barrier()


def open_tracker(ctx: PhaseContext) -> Tracker:
    return make_tracker(ctx.cfg.wandb, world=ctx.world, run_dir=ctx.directory, group=ctx.cfg.run.name,
                        phase=ctx.phase, config=tracked_config(ctx.cfg))


def tracked_config(cfg: Config) -> dict:
    """The config as W&B gets it: privacy.noise_seed (seed material of the insecure reproducible
    mode: whoever knows it can subtract the noise) is redacted; everything else is public."""
    config = to_dict(cfg)
    if config.get("privacy", {}).get("noise_seed") is not None:
        config["privacy"]["noise_seed"] = "<redacted>"
    return config


def run_train(cfg: Config, phase: str = "train", evaluate_splits: bool = True,
              prepare: Callable[[PhaseContext], PhaseContext] | None = None,
              before_finish: Callable[[PhaseContext, DPEngine, dict, Tracker], None] | None = None) -> dict:
    """Single-model DP fine-tuning: `dpc train` (phase train, in the run root) and the teacher phase.
    ``evaluate_splits=False``: no evaluation (a `dpc tune` trial, whose results are not released).
    ``prepare`` may change the context before anything is planned (`dpc audit` adds its canaries);
    ``before_finish`` sees the trained engine before the results are written (it scores them)."""
    from dist_dpc.pipeline.head_init import HeadStart
    from dist_dpc.pipeline.lineage import import_lineage

    ctx = open_phase(cfg, phase)
    if prepare is not None:
        ctx = prepare(ctx)
    import_lineage(ctx, cfg.model.name, role="model.name")
    if not cfg.privacy.enabled:
        warn_loudly(ctx.world, "privacy.enabled=false: training WITHOUT differential privacy; the model may leak its data")
    model = load_for_phase(ctx, lambda: ctx.task.load_model(cfg.model, ctx.tokenizer, num_labels=ctx.num_labels,
                                                            label_names=ctx.label_names, seed=cfg.run.seed),
                           name=cfg.model.name)
    steps = planned_steps(cfg.train.epochs, cfg.train.max_steps, steps_per_epoch(ctx))
    check_before_spending(ctx, model, steps=steps)
    start = HeadStart.plan(ctx, model)
    privacy = phase_privacy(ctx, steps + start.probe_steps, fixed=start.fixed)
    tracker = open_tracker(ctx)
    info = start.run(ctx, model, ctx.directory, ctx.key)
    engine = train_dp(ctx, model, directory=ctx.directory, steps=steps, privacy=privacy, tracker=tracker)
    metrics = evaluate_engine(engine, ctx) if evaluate_splits else {}
    results = phase_results(ctx, engine, metrics, steps, **start.results(ctx, info))
    save_model(ctx, engine, ctx.directory / "model")
    if before_finish is not None:
        before_finish(ctx, engine, results, tracker)
    finish_phase(ctx, tracker, results, ctx.directory / "model")
    return results


def summary(world, results: dict) -> None:
    from dist_dpc.tasks import TASKS

    lines = ["", "=" * 72, f"phase {results.get('phase', 'train')}"]
    for name, m in results["metrics"].items():  # none for the audit's canary task
        task = TASKS[results.get("task", "sequence_classification")]
        lines.append(f"{name}: {task.describe(m)}")
    if results["private"] and results.get("noise_multiplier") is None:  # trained on DP outputs only
        lines.append(f"privacy: epsilon={results['epsilon']:.3f} ({results['accountant'].upper()}, the whole run tree; "
                     f"other accountant {results['epsilon_rdp']:.3f}), delta={results['delta']:.3g}; this phase read "
                     "no private data and spent nothing")
    elif results["private"]:
        lines.append(f"privacy: epsilon={results['epsilon']:.3f} ({results['accountant'].upper()}, whole run tree so "
                     f"far; other accountant {results['epsilon_rdp']:.3f}), delta={results['delta']:.3g}, "
                     f"sigma={results['noise_multiplier']:.4f}, q={results['sample_rate']:.5f}, "
                     f"steps={results['steps']}, N={results['dataset_size']}, sampling={results['sampling']}")
        if results.get("statistics_released_without_dp"):
            lines.append("WARNING: statistics released without DP (privacy.release_exact_statistics=true): the exact "
                         "training statistics this run logged are not covered by the guarantee above")
    else:
        lines.append("privacy: NONE (privacy.enabled=false) - this model carries no DP guarantee")
    lines.append("=" * 72)
    log(world, "\n".join(lines))
