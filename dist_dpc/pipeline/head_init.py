"""The DP start of a classifier head, before a phase's DP fine-tuning (config section ``head_init``).

  1. one pass of the frozen model over the private training set (each rank its share of the rows):
     the [CLS] states (a distilling phase passes its teacher's logits in, from its own pass);
  2. centre_pooler: pooler := tanh([CLS] - m), m a DP mean of the [CLS] states (Gaussian mechanism);
  3. probe_epochs: DP-SGD on the classifier alone over the pooled features (the probe), at the
     phase's sigma and sampling rate, so its steps simply add to the phase's DP-SGD steps.

By default (head_init settings null) both run for a BERT-style classifier and neither for any other
head (HeadInitConfig.resolved). The result is saved in the phase (or round) directory before
fine-tuning starts: a restarted phase reloads it instead of reading the private data again, so the
ledger's single entry stays true.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dist_dpc.engine.distributed import collective_device
from dist_dpc.engine.partitioned import gathered_forward, model_is_partitioned, whole
from dist_dpc.models.heads import centre_pooler_, cls_hidden, has_pooled_head, pool, pooled_head, set_classifier_
from dist_dpc.pipeline.config import HeadInitConfig
from dist_dpc.pipeline.dataset_pass import per_example_outputs
from dist_dpc.pipeline.trainer import local_device, planned_steps, steps_per_epoch
from dist_dpc.pipeline.trainer import sample_rate as phase_sample_rate
from dist_dpc.privacy.accounting import Mechanism
from dist_dpc.privacy.config import PrivacyConfig
from dist_dpc.privacy.linear_probe import dp_linear_probe, private_mean
from dist_dpc.privacy.randomness import SecretKey
from dist_dpc.utils.atomic import atomic_write
from dist_dpc.utils.logging import log

FILE = "head_init.pt"
FIELD = "head_init.centre_pooler / head_init.probe_epochs"


@dataclass(frozen=True)
class HeadStart:
    """The head_init of one fine-tuning run (a phase, or one prune round): what it will spend.

    The phase reserves ``fixed`` (the DP mean, a set sigma) and ``probe_steps`` more DP-SGD steps at
    its own sigma and q; as each is released it goes into the ledger through the phase's budget."""
    settings: HeadInitConfig  # resolved for the model
    probe_steps: int
    fixed: tuple[Mechanism, ...]  # the DP mean, a fixed sigma (not calibrated)

    @classmethod
    def plan(cls, ctx, model: torch.nn.Module) -> "HeadStart":
        """Refuses head_init asked for on a head it cannot serve before the phase reserves anything."""
        h = ctx.cfg.head_init.resolved(has_pooled_head(model), type(model).__name__, dataset_size=ctx.train_size,
                                       hidden_size=getattr(model.config, "hidden_size", None))
        probe, fixed = head_init_cost(h, steps_per_epoch(ctx), private=ctx.cfg.privacy.enabled, phase=ctx.phase)
        return cls(h, probe, fixed)

    def results(self, ctx, info: dict) -> dict:
        """Extra fields of the phase's results.json: what was done (the last run's info)."""
        return {"head_init": info} if self.settings.enabled else {}

    def run(self, ctx, model: torch.nn.Module, directory: Path, key: SecretKey, **probe) -> dict:
        return initialise_head(ctx, model, self.settings, directory=directory, steps=self.probe_steps,
                               key=key.derive("head_init"), **probe)


def head_init_cost(settings: HeadInitConfig, steps_per_epoch: int, *, private: bool,
                   phase: str = "") -> tuple[int, tuple[Mechanism, ...]]:
    """What resolved head_init settings add to a run: probe steps (at the run's own sigma and q) and
    the DP mean (a fixed sigma). `dpc tune` plans its trials with the same function."""
    probe = planned_steps(settings.probe_epochs, None, steps_per_epoch) if settings.probe_epochs > 0 else 0
    fixed = (_dp_mean(settings, phase),) if settings.centre_pooler and private else ()
    return probe, fixed


def _dp_mean(settings: HeadInitConfig, phase: str) -> Mechanism:
    """head_init's DP mean: one Gaussian mechanism over all N examples (q = 1)."""
    return Mechanism(settings.mean_noise_multiplier, 1.0, 1, phase)


def initialise_head(ctx, model: torch.nn.Module, h: HeadInitConfig, *, directory: Path, steps: int, key: SecretKey,
                    teacher_logits: torch.Tensor | None = None, alpha: float = 0.0, temperature: float = 1.0) -> dict:
    """Centre the pooler and/or probe the classifier of ``model`` in place; returns what was done.
    ``teacher_logits``: a distillation teacher's logits of every training example in dataset order
    (dataset_pass.teacher_logits), the probe's soft targets.
    Each DP release is recorded through ``ctx.budget`` the moment it is computed, before anything
    derived from it is written (head_init.pt, the model). ``h``: the settings resolved for ``model``."""
    if not h.enabled:
        return {}
    head = pooled_head(model, FIELD)
    if h.centre_pooler and h.freeze_pooler_weight:
        head.pooler.dense.weight.requires_grad_(False)
    saved = Path(directory) / FILE
    # At ZeRO 3 (a model built under zero.Init) the head's few tensors are gathered whole while it is
    # set, and rank 0's values become every rank's partition on leaving (whole(..., modify=True)).
    head_params = [*head.pooler.parameters(), *head.classifier.parameters()]
    if saved.is_file():
        state = torch.load(saved, weights_only=True)
        with whole(head_params, modify=True):
            head.pooler.load_state_dict(state["pooler"])
            head.classifier.load_state_dict(state["classifier"])
        log(ctx.world, f"[{ctx.phase}] head_init: reloaded {saved} (the private data is not read again)")
        return released_info(state["info"], ctx.cfg.privacy)
    cls, labels = _features(ctx, model, head)
    with whole(head_params, modify=True):
        info = _fit_head(ctx, head, h, cls, labels, teacher_logits, steps=steps, key=key, alpha=alpha,
                         temperature=temperature)
        if ctx.world.is_main:
            state = {"pooler": head.pooler.state_dict(), "classifier": head.classifier.state_dict(), "info": info}
            atomic_write(saved, lambda tmp: torch.save(state, tmp))
    torch.distributed.barrier()
    log(ctx.world, f"[{ctx.phase}] head_init: {info}")
    return info


def _fit_head(ctx, head, h: HeadInitConfig, cls, labels, teacher_logits, *, steps: int, key: SecretKey,
              alpha: float, temperature: float) -> dict:
    """The DP mean and the probe on the gathered features; the head set in place on every rank."""
    private = ctx.cfg.privacy.enabled
    budget = ctx.budget if private else None
    noise_multiplier = budget.noise_multiplier if budget is not None else 0.0
    sample_rate = budget.sample_rate if budget is not None else phase_sample_rate(ctx)
    info: dict = {}
    if h.centre_pooler:
        sigma = h.mean_noise_multiplier if private else 0.0
        mean, clipped = private_mean(cls, clip_norm=h.mean_clip_norm, noise_multiplier=sigma,
                                     key=key.derive("dp-mean"), public_size=ctx.train_size)
        if budget is not None:
            budget.release(_dp_mean(h, ctx.phase))
        centre_pooler_(head, mean)
        info["pooler"] = {"noise_multiplier": sigma, "clip_norm": h.mean_clip_norm, "clipped_fraction": clipped}
    if steps > 0:
        result = dp_linear_probe(pool(head, cls).float(), labels, weight=head.classifier.weight,
                                 bias=head.classifier.bias, sample_rate=sample_rate, steps=steps,
                                 noise_multiplier=noise_multiplier,
                                 max_grad_norm=ctx.cfg.privacy.max_grad_norm, lr=h.probe_lr, key=key.derive("dp-probe"),
                                 teacher_logits=teacher_logits, alpha=alpha, temperature=temperature,
                                 public_size=ctx.train_size)
        if budget is not None:
            budget.release(budget.dp_sgd(steps))
        set_classifier_(head, result.weight, result.bias)
        info["probe"] = {"steps": steps, "noise_multiplier": noise_multiplier,
                         "sample_rate": sample_rate, "lr": h.probe_lr, "clipped_fraction": result.clipped_fraction}
    info = released_info(info, ctx.cfg.privacy)
    # Every rank computed the same values from the same gathered features; rank 0's are made the
    # only ones anyway, so replicas cannot drift apart by a rounding difference.
    for tensor in [*head.pooler.parameters(), *head.classifier.parameters()]:
        _broadcast(tensor)
    return info


def released_info(info: dict, privacy: PrivacyConfig) -> dict:
    """What head_init may report (log, results.json, head_init.pt): its settings. The fractions of
    [CLS] states and probe gradients clipped are exact statistics of the private data, kept only
    where those may be released (privacy off, or privacy.release_exact_statistics)."""
    if privacy.releases_training_statistics:
        return info
    return {step: {k: v for k, v in values.items() if k != "clipped_fraction"} for step, values in info.items()}


def _features(ctx, model, head):
    """[CLS] states (N, hidden) of every training example in dataset order, and the labels."""
    was_training = model.training
    model.eval()
    if not model_is_partitioned(model):  # zero.Init placed the partitions already
        model.to(local_device())

    def states(batch):
        with gathered_forward(head.encoder):  # ZeRO 3: one module's weights whole at a time
            return cls_hidden(head, batch)

    cls = per_example_outputs(ctx, states)
    model.train(was_training)
    return cls, torch.tensor([int(label) for label in ctx.train_set.labels])


def _broadcast(tensor: torch.Tensor) -> None:
    if torch.distributed.get_world_size() > 1:
        buf = tensor.detach().to(collective_device()).contiguous()
        torch.distributed.broadcast(buf, src=0)
        with torch.no_grad():
            tensor.copy_(buf.to(tensor.device))
