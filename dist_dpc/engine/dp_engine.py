"""The DP-SGD step under DeepSpeed ZeRO 0-3. Read this file top to bottom.

One logical step, for this rank's fixed-shape micro-batches (padding rows have sample_mask 0):

  1. per-sample losses -> per-sample clip factors -> clipped gradient sum, accumulated over the
     micro-batches and reduced across ranks by DeepSpeed exactly as in a non-DP step:
       per_layer: one forward + one backward; every layer clips its own per-sample gradient to
                  C / sqrt(L) inside the backward (dist_dpc.privacy.clipper);
       flat:      book-keeping, in one engine forward: the model's forward and an inner backward in
                  which every layer adds its per-sample norms and keeps its input and output gradient
                  (no weight gradients, no reduction); then each layer's module is called on a token
                  whose backward, run by engine.backward, returns that layer's sum of
                  min(1, C / ||g_i||) g_i: DeepSpeed treats it as any micro-batch and layer (ZeRO 3
                  gathers the layer's weights around it; every stage reduces the sums);
  2. in a step pre-hook on the optimizer DeepSpeed finally steps (each rank's fp32 partition):
     undo DeepSpeed's mean over ranks, add N(0, sigma^2 C^2) once per coordinate, divide by the
     expected batch size;
  3. the optimizer update; the accountant records (sigma, q).

No collective is added to DeepSpeed's own: the sampler derives every rank's micro-step count locally.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dist_dpc.engine import deepspeed_seam
from dist_dpc.engine.distributed import WorldInfo
from dist_dpc.engine.ds_config import fill_width_autos, model_width
from dist_dpc.privacy.accounting import Mechanism, PrivacyAccountant, calibrate_noise_multiplier, compute_epsilon
from dist_dpc.privacy.clipper import (BypassedLayerError, ClipMode, GradientHookError, PerSampleClipper, check_no_bypass,
                                      gradient_hooks, refuse_gradient_hooks)
from dist_dpc.privacy.config import PrivacyConfig
from dist_dpc.privacy.accounting import check_delta, delta_default
from dist_dpc.privacy.noise import add_gaussian_noise_, choose_noise_sampler
from dist_dpc.privacy.randomness import SecretKey

# loss_fn(forward, micro_batch) -> per-sample losses (B,); ``forward`` is the DeepSpeed engine or
# its raw module and is called with the model's keyword inputs.
LossFn = Callable[[Callable, dict], torch.Tensor]


class PrivacyBudgetError(RuntimeError):
    """The step would spend more privacy than the configured budget."""


class NonFiniteGradientError(RuntimeError):
    """A NaN/inf gradient reached the noise hook: a sample produced non-finite values."""


@dataclass
class StepStats:
    """What one step saw of its private batch. Every field but ``step`` is an exact statistic of
    the training data, never noised (the realised batch size alone reveals membership under Poisson
    sampling): for tests and debugging. Runs release them only through trainer.step_metrics, which
    drops them under DP unless privacy.release_exact_statistics is set."""
    step: int
    loss: float                    # mean per-sample loss of this rank's real samples
    local_samples: int             # real samples on this rank
    logical_batch_size: int        # real samples on all ranks (known locally: shared sampler)
    clipped_fraction: float        # of this rank's real samples
    grad_norm_quantiles: dict[str, float] = field(default_factory=dict)  # per-sample norms, this rank


def resolve_noise(privacy: PrivacyConfig, *, dataset_size: int, sample_rate: float, planned_steps: int,
                  prior: tuple[Mechanism, ...] = ()) -> tuple[float, float, int]:
    """(sigma, delta, max_steps) before training starts; refuses what the budget cannot pay for."""
    delta = privacy.delta if privacy.delta is not None else delta_default(dataset_size)
    check_delta(delta, dataset_size)
    if not privacy.enabled:
        return 0.0, delta, planned_steps
    if privacy.noise_multiplier is None:
        sigma = calibrate_noise_multiplier(privacy.target_epsilon, delta, sample_rate, planned_steps,
                                           accountant=privacy.accountant, prior=prior)
        return sigma, delta, planned_steps
    sigma = privacy.noise_multiplier
    if privacy.target_epsilon is not None:
        eps = compute_epsilon(list(prior) + [Mechanism(sigma, sample_rate, planned_steps)], delta, privacy.accountant)
        if eps > privacy.target_epsilon * (1 + 1e-6):
            raise PrivacyBudgetError(
                f"privacy.noise_multiplier={sigma} for {planned_steps} steps at q={sample_rate:.4g} spends "
                f"epsilon={eps:.3f} > privacy.target_epsilon={privacy.target_epsilon}: raise the noise multiplier, "
                "train fewer steps/epochs, lower the batch size, or leave noise_multiplier unset to calibrate it")
    return sigma, delta, planned_steps


class DPEngine:
    """DeepSpeed engine + per-sample clipping + partition noise + accountant, one logical step per call."""

    _self_tested = False  # set by the first train_step's _self_test
    _stepping = False     # true only inside train_step's optimizer step (the noise hook checks it)
    steps_started = 0     # train_step calls past the budget check; a failed one counts (never decreases)
    broken: str | None = None  # why the engine refuses further steps (a failed or bypassed step)

    def __init__(self, model: torch.nn.Module, ds_config: dict, privacy: PrivacyConfig, *, dataset_size: int,
                 expected_batch_size: int, planned_steps: int, loss_fn: LossFn, world: WorldInfo, key: SecretKey,
                 poisson_sampling: bool = True, prior: tuple[Mechanism, ...] = (), phase: str = "train",
                 lr_schedule: Callable[[int], float] | None = None, sample_rate: float | None = None):
        import deepspeed

        self.privacy, self.world, self.loss_fn = privacy, world, loss_fn
        self._key = key  # noise and dropout; never saved (see state_dict)
        self.dataset_size, self.expected_batch_size = dataset_size, expected_batch_size
        # q: B / N, or given (a training part of data-dependent size samples at its public stand-in's rate)
        self.sample_rate = sample_rate if sample_rate is not None else expected_batch_size / dataset_size
        self.poisson_sampling = poisson_sampling
        self.noise_multiplier, self.delta, self.max_steps = resolve_noise(
            privacy, dataset_size=dataset_size, sample_rate=self.sample_rate, planned_steps=planned_steps, prior=prior)
        # Validated before DeepSpeed sees the model: unsupported or tied layers fail here.
        self.clipper = PerSampleClipper(model, privacy.max_grad_norm).attach() if privacy.enabled else None
        _warn_bf16_sum_rounding(privacy, ds_config, model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # ds_numel: a model built under deepspeed.zero.Init (HF from_pretrained at ZeRO 3) arrives already
        # partitioned, its tensors empty placeholders whose numel() is 0 -- which would disarm the check.
        trainable_numel = sum(getattr(p, "ds_numel", p.numel()) for p in trainable)
        if privacy.enabled:
            refuse_gradient_hooks(model)  # a user's hook on a gradient would see the clipped sum before the noise
        ds_config = fill_width_autos(ds_config, model_width(model))  # HF templates' "auto" bucket sizes
        self.ds, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
        self._gradient_hooks = gradient_hooks(model)  # DeepSpeed's own (its reduction); any other is refused per step
        self._check_loss_scale()
        self.optimizer = deepspeed_seam.inner_torch_optimizer(self.ds)
        self.optimizer.register_step_pre_hook(self._noise_and_normalise)
        self._partitions = deepspeed_seam.hooked_partitions(self.ds)
        self.partition_numel = sum(t.numel() for t in self._partitions)
        self._begin_noise_count()
        if self.clipper is not None:
            self._check_partitions_cover(trainable_numel)
        # lr of step s = base lr * lr_schedule(s), a function of the step count alone (resume-safe).
        self.lr_schedule = lr_schedule
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        disjoint = deepspeed_seam.partitions_are_disjoint(self.ds)
        self.noise_stream = world.rank if disjoint else 0
        # Drawn on the GPU that holds the partition, or on the host (privacy.noise_sampler; refusals there).
        self.noise_on_device = privacy.enabled and choose_noise_sampler(
            privacy.noise_sampler, self._partitions, replicated=not disjoint,
            world_size=world.world_size, key=key)
        self.accountant = PrivacyAccountant(accountant=privacy.accountant, delta=self.delta, prior=prior, phase=phase)
        self.steps_done = 0
        self._norm_sink = trainable
        self.post_noise_hooks: list[Callable[[torch.optim.Optimizer], None]] = []  # e.g. pruning masks

    @staticmethod
    def check_settings(model: torch.nn.Module, ds_config: dict, privacy: PrivacyConfig) -> None:
        """The refusals of __init__ that need only the model and the configs (no data, no DeepSpeed):
        a caller runs them before anything reads the private data."""
        if privacy.enabled:
            PerSampleClipper(model, privacy.max_grad_norm)  # unsupported, reused or tied layers; not attached
            refuse_gradient_hooks(model)

    # -- the DP step ----------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict], logical_batch_size: int) -> StepStats:
        if self.broken is not None:
            raise RuntimeError(f"this engine stopped: {self.broken}. Its gradient buffers (and at ZeRO 3 possibly "
                               "some updated sub-groups) hold part of a step; resume from a checkpoint in a new process")
        if self.steps_done >= self.max_steps:
            raise PrivacyBudgetError(
                f"step {self.steps_done + 1} would exceed the privacy budget (epsilon calibrated for "
                f"{self.max_steps} steps); raise privacy.target_epsilon or stop training here")
        if self.clipper is not None:  # before anything runs: nothing is computed, the engine stays usable
            refuse_gradient_hooks(self.ds.module, self._gradient_hooks)
        try:
            return self._train_step(micro_batches, logical_batch_size)
        except BaseException as err:
            # A step that failed half-way leaves clipped sums of the micro-batches it processed in
            # DeepSpeed's buffers: retrying it would count those examples twice under one noise draw.
            self.broken = self.broken or f"step {self.steps_done + 1} failed ({type(err).__name__})"
            raise
        finally:
            self._stepping = False

    def _train_step(self, micro_batches: list[dict], logical_batch_size: int) -> StepStats:
        self.steps_started += 1
        self._check_no_stray_gradients()
        self._seed_dropout()
        self._begin_noise_count()
        self.ds.train()
        self._self_test(micro_batches)
        losses, norms, clipped = [], [], []
        num_micro = len(micro_batches)
        for j, micro in enumerate(micro_batches):
            self.ds.set_gradient_accumulation_boundary(j == num_micro - 1)
            loss_B, norm_B, clipped_B = self._accumulate(micro)
            real = micro["sample_mask"] > 0
            losses.append(loss_B[real])
            if norm_B is not None:
                norms.append(norm_B[real])
                clipped.append(clipped_B[real])
        if self.lr_schedule is not None:
            factor = self.lr_schedule(self.steps_done)
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor
        self._stepping = True
        self.ds.step()  # -> _noise_and_normalise, then the optimizer update
        self._stepping = False
        self._check_noise_count(after_step=True)
        self.steps_done += 1
        if self.privacy.enabled:
            self.accountant.step(self.noise_multiplier, self.sample_rate)
        return self._stats(losses, norms, clipped, logical_batch_size)

    def _accumulate(self, micro: dict):
        """Forward/backward of one micro-batch: only clipped per-sample gradients reach DeepSpeed."""
        mask = micro["sample_mask"].to(self.ds.device)
        batch = {k: v.to(self.ds.device) if torch.is_tensor(v) else v for k, v in micro.items()}
        rows = mask.shape[0]
        if self.clipper is None:  # non-private training, same normalisation
            per_sample = self.loss_fn(self.ds, batch)
            self.ds.backward((per_sample * mask).sum())
            return per_sample.detach(), None, None
        if self.privacy.clipping == "per_layer":
            with self.clipper.pass_mode(ClipMode.PER_LAYER, rows):
                per_sample = self.loss_fn(self.ds, batch)
                self.ds.backward((per_sample * mask).sum())
            _check_padding_silent(self.clipper.sq_norms, mask)
            return per_sample.detach(), self.clipper.sq_norms.sqrt(), self.clipper.clipped
        # flat in one backward (book-keeping), inside one engine forward (dist_dpc.privacy.clipper.flat_pass).
        seen = {}

        def norms_pass(model_forward):
            per_sample = seen["losses"] = self.loss_fn(model_forward, batch)
            grads = torch.autograd.grad((per_sample * mask).sum(), self._norm_sink, allow_unused=True)
            if any(g is not None for g in grads):  # a rule without BOOKKEEP: its gradient would be dropped
                raise BypassedLayerError("a DP layer rule returned a weight gradient in flat clipping's book-keeping "
                                         "pass (it does not implement ClipMode.BOOKKEEP); use privacy.clipping=per_layer")
            _check_padding_silent(self.clipper.sq_norms, mask)
            return self.clipper.flat_factors(self.clipper.sq_norms)

        with self.clipper.pass_mode(ClipMode.BOOKKEEP, rows):
            handed = self.clipper.flat_pass(norms_pass, self.ds)
        self.ds.backward(handed)
        self.clipper.check_handed_over()  # a hook that scaled or dropped the sums stops the step (train_step: broken)
        return seen["losses"].detach(), self.clipper.sq_norms.sqrt(), self.clipper.clipped

    def _check_no_stray_gradients(self) -> None:
        """Before the first micro-batch: no gradient may be waiting in the module's .grad. A backward
        outside train_step (a user's loss.backward() on engine.module, an evaluation that forgot no_grad)
        would put an unclipped gradient there, and this step's noise would then cover it as if it were
        clipped. After a DeepSpeed step no parameter holds one (no cost); else one host sync."""
        if self.clipper is None:
            return
        held = [(name, p.grad) for name, p in self.ds.module.named_parameters() if p.grad is not None]
        if not held or not bool(torch.stack([g.any() for _, g in held]).any()):  # one sync, if any
            return
        for name, grad in held:
            if bool(grad.any()):
                self.broken = f"a gradient outside train_step reached {name}"
                raise RuntimeError(f"DP-SGD: {name} holds a gradient before step {self.steps_done + 1}: a backward ran "
                                   "outside train_step (e.g. loss.backward() on engine.module), and its unclipped "
                                   "gradient would be stepped with this step's noise. The engine stops; compute "
                                   "gradients only through train_step (evaluate under torch.no_grad())")

    def _self_test(self, micro_batches: list[dict]) -> None:
        """Once per engine, before the first real backward: refuse parameters whose gradients would
        bypass the DP layers (dist_dpc.privacy.clipper.check_no_bypass). It is the flat mode's
        norms pass, through the raw module (a backward through the DeepSpeed engine would start
        ZeRO's reduction), so it works at every stage; the RNG is replayed so that the real pass
        draws the same dropout masks as without it."""
        if self.clipper is None or self._self_tested or not micro_batches:
            return
        micro = micro_batches[0]
        mask = micro["sample_mask"].to(self.ds.device)
        batch = {k: v.to(self.ds.device) if torch.is_tensor(v) else v for k, v in micro.items()}
        rng = _RngSnapshot()
        try:
            check_no_bypass(self.clipper, self.ds.module, lambda: (self.loss_fn(self.ds.module, batch) * mask).sum(),
                            mask.shape[0])
        finally:
            rng.restore()
        self._self_tested = True

    def _noise_and_normalise(self, optimizer, args, kwargs) -> None:
        """Optimizer step pre-hook: this rank's partition of the reduced clipped sum -> DP gradient.

        ZeRO-3 steps its sub-groups one at a time, calling this hook once per sub-group: the noise is
        labelled (step, stream, call index, tensor index), so no two draws share a generator however
        many sub-groups there are, and ZeRO 0 replicas (stream 0 everywhere) draw identical noise."""
        if not self._stepping:
            # engine.ds.backward/step called directly: gradients that were never clipped would be
            # stepped (or, refused here, stay in the buffers for the next step). Stop for good.
            self.broken = "the optimizer was stepped outside DPEngine.train_step (e.g. engine.ds.step())"
            raise RuntimeError(f"DP-SGD: {self.broken}: its gradients were not clipped per sample. Train only "
                               "through train_step (dist_dpc.initialize: engine.train_batch)")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.clipper is not None:
            try:  # again here: a hook added during the step (from loss_fn, a forward hook) ran on the sums
                refuse_gradient_hooks(self.ds.module, self._gradient_hooks)
            except GradientHookError as err:
                self.broken = f"a gradient hook was added during step {self.steps_done + 1}"
                raise GradientHookError(f"{err} (it was added during step {self.steps_done + 1}, whose gradients it "
                                        "may have altered: the engine stops before the update)") from None
            self._count_noised(params)
        grads = [p.grad for p in params if p.grad is not None]
        if self.clipper is not None:
            self._check_finite(grads)
        if self.world.world_size != 1:  # (at world 1 a pass over the partition for nothing)
            for g in grads:
                g.mul_(self.world.world_size)  # DeepSpeed averaged over ranks; DP-SGD wants the sum
        if self.clipper is not None:
            std = self.noise_multiplier * self.privacy.max_grad_norm
            add_gaussian_noise_(grads, std, self._key, "dp-sgd", self.steps_done, self.noise_stream, self._hook_calls,
                                on_device=self.noise_on_device)
        self._hook_calls += 1
        for g in grads:
            g.div_(self.expected_batch_size)
        for hook in self.post_noise_hooks:
            hook(optimizer)

    def _check_finite(self, grads: list[torch.Tensor]) -> None:
        """Before noising: every gradient is finite. Both clipping modes drop a sample with a non-finite
        norm (factor 0, rows zeroed), so this should not fire; if it does (a layer rule that lets a NaN
        through), the run must stop rather than release a NaN model.

        One sum per tensor and one host sync per hook call: in IEEE arithmetic a sum that meets a NaN
        or an infinity is NaN or infinite, so a finite sum proves every element finite. (A sum of finite
        elements can only come out infinite by overflowing, far beyond what clipped sums reach, and
        would stop the run: the safe side. fp16/bf16 tensors are summed in float32, since an fp16 sum
        of finite clipped sums can exceed 65504.) torch.isfinite(g).all() would cost four passes over
        the partition (about 0.1 of a non-DP step on bench/dp_step.py's wide CPU shape); a sum costs one."""
        sums = [g.sum(dtype=torch.float32) if g.dtype in (torch.float16, torch.bfloat16) else g.sum() for g in grads]
        if sums and not bool(torch.isfinite(torch.stack(sums)).all()):
            raise NonFiniteGradientError(
                f"a non-finite gradient reached the DP step at step {self.steps_done} (privacy.clipping="
                f"{self.privacy.clipping}): a sample produced NaN/inf. Both clipping modes drop such samples (clip "
                "factor 0), so a layer rule let one through; the run stops "
                "before the update"
                + (" (ZeRO-3 sub-groups already stepped this step keep their update)" if self._hook_calls else ""))

    # -- noise accounting: every coordinate the optimizer steps is noised exactly once ------------
    def _check_partitions_cover(self, trainable_numel: int) -> None:
        """Once, at construction: the partitions this hook will noise, all ranks together, cover every
        trainable parameter (>=: DeepSpeed pads partitions for alignment). At ZeRO 0 each rank must hold
        all of them, or ranks sharing noise stream 0 would put the same draws on different coordinates."""
        local = self.partition_numel
        if not deepspeed_seam.partitions_are_disjoint(self.ds):
            if local != trainable_numel:
                raise RuntimeError(
                    f"the optimizer DeepSpeed steps holds {local} elements on rank {self.world.rank}, but the model "
                    f"has {trainable_numel} trainable ones: at ZeRO 0 every rank must hold all of them (identical "
                    "noise on replicas). This DeepSpeed setup partitions them anyway; use zero_optimization.stage >= 1")
            return
        total = torch.tensor([local], dtype=torch.int64, device=self.ds.device)
        if self.world.world_size > 1:
            torch.distributed.all_reduce(total)
        if int(total) < trainable_numel:
            raise RuntimeError(
                f"the optimizer partitions of all {self.world.world_size} ranks hold {int(total)} elements but the "
                f"model has {trainable_numel} trainable ones: some coordinates would be updated without DP noise. "
                "Check the DeepSpeed config (offload ratio, ZenFlow, untested optimizers)")

    def _begin_noise_count(self) -> None:
        self._hook_calls, self._noised_numel, self._noised_ids = 0, 0, set()

    def _count_noised(self, params: list[torch.Tensor]) -> None:
        """Called from the pre-hook, before the update: raises on a tensor without gradient, one
        outside this rank's partition, one presented twice, or (on the last expected call) a total
        other than the partition size."""
        expected = {id(t) for t in self._partitions}
        for p in params:
            if p.grad is None:
                # torch optimizers skip such a param, DeepSpeed's may not: either way the count is off.
                raise RuntimeError(f"noise hook: a {p.numel()}-element tensor of this rank's optimizer partition "
                                   "has no gradient at the step; it would be stepped or skipped without noise. "
                                   "Stopping before the update")
            if id(p) not in expected or id(p) in self._noised_ids:
                raise RuntimeError(f"noise hook: a {p.numel()}-element tensor is "
                                   + ("not part of this rank's partition" if id(p) not in expected else
                                      "presented twice in one step (it would be noised twice)")
                                   + ". Stopping before the update")
            self._noised_ids.add(id(p))
            self._noised_numel += p.numel()
        if self._hook_calls + 1 == self._expected_calls():
            self._check_noise_count(after_step=False)

    def _expected_calls(self) -> int:
        # ZeRO-3 presents one sub-group's flat partition per optimizer.step(); the others one call.
        return len(self._partitions) if deepspeed_seam.zero_stage(self.ds) == 3 else 1

    def _check_noise_count(self, after_step: bool) -> None:
        if self.clipper is None or self._noised_numel == self.partition_numel:
            return
        when = ("after the step (ZeRO-3 had already updated the noised sub-groups; the run stops here)"
                if after_step else "stopping before the update")
        raise RuntimeError(
            f"noise hook: {self._noised_numel} elements were noised at step {self.steps_done} but this rank's "
            f"optimizer partition has {self.partition_numel}, {when}. Some coordinates were updated outside the "
            "hooked optimizer (offload_optimizer.ratio < 1, ZenFlow, an untested DeepSpeed path) or lost their "
            "gradient, or DeepSpeed skipped its step (it does so by itself at ZeRO 3 on a NaN/inf gradient: a "
            "sample produced non-finite values, which privacy.clipping=per_layer drops); use a DeepSpeed config "
            "from ds_configs/")

    # -- helpers ---------------------------------------------------------------------------------
    def _seed_dropout(self) -> None:
        # Dropout depends only on (key, step, rank): a resumed run with the same key replays the same
        # masks. A hash of the key, so torch's global seed reveals nothing of it.
        torch.manual_seed(self._key.seed64("dropout", self.steps_done, self.world.rank))

    def _check_loss_scale(self) -> None:
        scale = getattr(self.ds.optimizer, "loss_scale", 1.0)
        scale = float(scale() if callable(scale) else scale)
        if self.clipper is not None and scale != 1.0:
            raise ValueError(f"DeepSpeed applies a loss scale of {scale}: clipping thresholds inside backward would "
                             "be off by that factor; use bf16 or fp32 without loss scaling")

    def _stats(self, losses, norms, clipped, logical_batch_size: int) -> StepStats:
        loss_all = torch.cat(losses) if losses else torch.zeros(0)
        stats = StepStats(step=self.steps_done, loss=float(loss_all.float().mean()) if loss_all.numel() else float("nan"),
                          local_samples=int(loss_all.numel()), logical_batch_size=logical_batch_size,
                          clipped_fraction=0.0)
        if norms:
            n = torch.cat(norms).float()
            if n.numel():
                stats.clipped_fraction = float(torch.cat(clipped).float().mean())
                qs = torch.quantile(n, torch.tensor([0.1, 0.5, 0.9]))
                stats.grad_norm_quantiles = {"p10": float(qs[0]), "p50": float(qs[1]), "p90": float(qs[2])}
        return stats

    def epsilon(self, accountant: str | None = None) -> float:
        return self.accountant.epsilon(self.delta, accountant=accountant) if self.privacy.enabled else math.inf

    def mechanism(self, phase: str = "") -> Mechanism:
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps_done, phase=phase)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # No key: checkpoints may be released. A run restarted in secure mode draws fresh noise.
        return {"steps_done": self.steps_done, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "delta": self.delta, "max_steps": self.max_steps,
                "accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("noise_multiplier", "sample_rate", "delta"):
            if not math.isclose(float(state[key]), float(getattr(self, key)), rel_tol=1e-9):
                raise ValueError(f"checkpoint has {key}={state[key]} but this run computed {getattr(self, key)}: "
                                 "resume with the same privacy and data configuration")
        self.steps_done = int(state["steps_done"])
        self.accountant.load_state_dict(state["accountant"])

    def save_checkpoint(self, directory: str | Path, tag: str, client_state: dict | None = None) -> None:
        state = {"dp_engine": self.state_dict(), **(client_state or {})}
        self.ds.save_checkpoint(str(directory), tag=tag, client_state=state)

    def load_checkpoint(self, directory: str | Path, tag: str | None = None) -> dict:
        if self.steps_started:
            raise RuntimeError(f"DPEngine.load_checkpoint after {self.steps_started} steps of this engine: load only "
                               "before training; loading later would rewind the step count under steps already run")
        _, client = self.ds.load_checkpoint(str(directory), tag=tag)
        if client is None:
            raise FileNotFoundError(f"no loadable checkpoint in {directory}")
        self.load_state_dict(client["dp_engine"])
        return client


def _check_padding_silent(sq_norms: torch.Tensor, mask: torch.Tensor) -> None:
    """Rows with sample_mask 0 must have no gradient at all. A loss_fn whose per-sample losses mix
    rows (e.g. a batch mean expanded to (B,)) gives padding rows a gradient that depends on the real
    ones, and each such row would add up to another C of one example to the sum."""
    padding = mask.to(sq_norms.device) == 0
    if bool(padding.any()) and bool((sq_norms[padding] != 0).any()):
        raise ValueError("DP-SGD: a padding row (sample_mask 0) has a non-zero per-sample gradient: the loss function "
                         "mixes rows. It must return one loss per example, each depending on that example alone "
                         "(shape (B,), e.g. cross_entropy(..., reduction='none'))")


_BF16_WARNED = False


def _warn_bf16_sum_rounding(privacy: PrivacyConfig, ds_config: dict, model: torch.nn.Module) -> None:
    """Once per process: what bf16 leaves outside the analysis (docs/privacy.md, Numerics)."""
    global _BF16_WARNED
    if _BF16_WARNED or not privacy.enabled:
        return
    half = any(p.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)
    if not (half or ds_config.get("bf16", {}).get("enabled")):
        return
    _BF16_WARNED = True
    warnings.warn("bf16 under DP: each sample's clipped contribution is <= C_l (flat: C) before the sum, but the bf16 "
                  "rounding of each micro-batch's clipped sum (relative 2^-8 of the sum per coordinate, which can exceed C_l) and its "
                  "accumulation are outside the privacy analysis; train in fp32 for a guarantee up to float32 rounding",
                  stacklevel=3)


class _RngSnapshot:
    """CPU (and current CUDA device) RNG state, to replay dropout after the start-up self-test's pass."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


def process_env_defaults() -> None:
    """DeepSpeed on CPU: silence the accelerator probe warning; gloo wants few threads per rank."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
