"""The DP start of a classifier head, before a phase's DP fine-tuning (config section ``head_init``).

  1. one pass of the frozen model over the private training set (each rank its share of the rows):
     the [CLS] states, and the teacher's logits when distilling;
  2. centre_pooler: pooler := tanh([CLS] - m), m a DP mean of the [CLS] states (Gaussian mechanism);
  3. probe_epochs: DP-SGD on the classifier alone over the pooled features (the probe), at the
     phase's sigma and sampling rate, so its steps simply add to the phase's DP-SGD steps.

The result is saved in the phase (or round) directory before fine-tuning starts: a restarted phase
reloads it instead of reading the private data again, so the ledger's single entry stays true.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dist_dpc.data import collate
from dist_dpc.engine.losses import model_inputs
from dist_dpc.models.heads import centre_pooler_, cls_hidden, pool, pooled_head, set_classifier_
from dist_dpc.pipeline.trainer import local_device, planned_steps, sample_rate, steps_per_epoch
from dist_dpc.privacy.accounting import Mechanism
from dist_dpc.privacy.config import PrivacyConfig
from dist_dpc.privacy.linear_probe import dp_linear_probe, private_mean
from dist_dpc.utils.atomic import atomic_write
from dist_dpc.utils.logging import log

FILE = "head_init.pt"


@dataclass(frozen=True)
class HeadStart:
    """The head_init of one fine-tuning run (a phase, or one prune round): what it will spend.

    The probe runs at the phase's sigma and q, so the phase's ledger entry is the DP mean (if any)
    plus one DP-SGD mechanism of probe_steps + fine-tuning steps."""
    probe_steps: int
    extra: tuple[Mechanism, ...]  # the DP mean, a fixed sigma (not calibrated)

    @classmethod
    def plan(cls, ctx) -> "HeadStart":
        h = ctx.cfg.head_init
        probe = planned_steps(h.probe_epochs, None, steps_per_epoch(ctx)) if h.probe_epochs > 0 else 0
        extra = ((Mechanism(h.mean_noise_multiplier, 1.0, 1, ctx.phase),)
                 if h.centre_pooler and ctx.cfg.privacy.enabled else ())
        return cls(probe, extra)

    def spent(self, ctx, privacy: PrivacyConfig) -> tuple[Mechanism, ...]:
        """Prior for the fine-tuning engine's accountant once the head start has run."""
        if not privacy.enabled or not self.probe_steps:
            return self.extra
        return (*self.extra, _dp_sgd(ctx, privacy, self.probe_steps))

    def spent_with(self, ctx, privacy: PrivacyConfig, steps: int) -> tuple[Mechanism, ...]:
        """What one whole fine-tuning run spends: the head start, then ``steps`` DP-SGD steps (the
        probe's steps and the fine-tuning's share sigma and q: one mechanism)."""
        if not privacy.enabled:
            return ()
        return (*self.extra, _dp_sgd(ctx, privacy, self.probe_steps + steps))

    def results(self, ctx, privacy: PrivacyConfig, steps: int, info: dict, rounds: int = 1) -> dict:
        """Extra fields of the phase's results.json: what was done (the last run's info), and every
        mechanism to record; ``steps`` are the phase's fine-tuning steps over all its ``rounds``."""
        if not ctx.cfg.head_init.enabled:
            return {}
        out = {"head_init": info}
        if privacy.enabled:
            out["mechanisms"] = [m.to_dict() for m in self.extra] * rounds + [
                _dp_sgd(ctx, privacy, self.probe_steps * rounds + steps).to_dict()]
        return out

    def run(self, ctx, model: torch.nn.Module, directory: Path, privacy: PrivacyConfig, seed: int, **probe) -> dict:
        return initialise_head(ctx, model, directory=directory, noise_multiplier=privacy.noise_multiplier,
                               sample_rate=sample_rate(ctx), steps=self.probe_steps, seed=seed, **probe)


def _dp_sgd(ctx, privacy: PrivacyConfig, steps: int) -> Mechanism:
    """The phase's DP-SGD mechanism (its sigma and q) over ``steps`` steps, probe and fine-tuning alike."""
    return Mechanism(privacy.noise_multiplier, sample_rate(ctx), steps, ctx.phase)


def initialise_head(ctx, model: torch.nn.Module, *, directory: Path, noise_multiplier: float, sample_rate: float,
                    steps: int, seed: int, teacher: torch.nn.Module | None = None, alpha: float = 0.0,
                    temperature: float = 1.0) -> dict:
    """Centre the pooler and/or probe the classifier of ``model`` in place; returns what was done."""
    h = ctx.cfg.head_init
    if not h.enabled:
        return {}
    head = pooled_head(model, "head_init.centre_pooler / head_init.probe_epochs")
    if h.centre_pooler and h.freeze_pooler_weight:
        head.pooler.dense.weight.requires_grad_(False)
    saved = Path(directory) / FILE
    if saved.is_file():
        state = torch.load(saved, weights_only=True)
        head.pooler.load_state_dict(state["pooler"])
        head.classifier.load_state_dict(state["classifier"])
        log(ctx.world, f"[{ctx.phase}] head_init: reloaded {saved} (the private data is not read again)")
        return state["info"]
    private = ctx.cfg.privacy.enabled
    cls, labels, teacher_logits = _features(ctx, model, head, teacher)
    info: dict = {}
    if h.centre_pooler:
        sigma = h.mean_noise_multiplier if private else 0.0
        mean, clipped = private_mean(cls, clip_norm=h.mean_clip_norm, noise_multiplier=sigma, seed=seed)
        centre_pooler_(head, mean)
        info["pooler"] = {"noise_multiplier": sigma, "clip_norm": h.mean_clip_norm, "clipped_fraction": clipped}
    if steps > 0:
        result = dp_linear_probe(pool(head, cls).float(), labels, weight=head.classifier.weight,
                                 bias=head.classifier.bias, sample_rate=sample_rate, steps=steps,
                                 noise_multiplier=noise_multiplier if private else 0.0,
                                 max_grad_norm=ctx.cfg.privacy.max_grad_norm, lr=h.probe_lr, seed=seed,
                                 teacher_logits=teacher_logits, alpha=alpha, temperature=temperature)
        set_classifier_(head, result.weight, result.bias)
        info["probe"] = {"steps": steps, "noise_multiplier": noise_multiplier if private else 0.0,
                         "sample_rate": sample_rate, "lr": h.probe_lr, "clipped_fraction": result.clipped_fraction}
    # Every rank computed the same values from the same gathered features; rank 0's are made the
    # only ones anyway, so replicas cannot drift apart by a rounding difference.
    for tensor in [*head.pooler.parameters(), *head.classifier.parameters()]:
        _broadcast(tensor)
    if ctx.world.is_main:
        state = {"pooler": head.pooler.state_dict(), "classifier": head.classifier.state_dict(), "info": info}
        atomic_write(saved, lambda tmp: torch.save(state, tmp))
    torch.distributed.barrier()
    log(ctx.world, f"[{ctx.phase}] head_init: {info}")
    return info


def _features(ctx, model, head, teacher):
    """[CLS] states (N, hidden) of every training example in dataset order, labels, teacher logits."""
    device = local_device()
    world, data, pad = ctx.world, ctx.train_set, ctx.tokenizer.pad_token_id
    mine = list(range(world.rank, len(data), world.world_size))
    was_training = model.training
    model.eval().to(device)
    if teacher is not None:
        teacher.eval().to(device)
    cls_parts, logit_parts = [], []
    batch_size = max(ctx.cfg.train.micro_batch_size, 64)
    for start in range(0, len(mine), batch_size):
        batch = collate([data[i] for i in mine[start:start + batch_size]], pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        cls_parts.append(cls_hidden(head, batch).float().cpu())
        if teacher is not None:
            with torch.no_grad():
                logit_parts.append(teacher(**model_inputs(batch)).logits.float().cpu())
    model.train(was_training)
    local = (mine, torch.cat(cls_parts) if cls_parts else torch.zeros(0, head.hidden_size),
             torch.cat(logit_parts) if logit_parts else None)
    gathered = [None] * world.world_size
    torch.distributed.all_gather_object(gathered, local)
    order = [i for rows, _, _ in gathered for i in rows]
    cls = torch.cat([c for _, c, _ in gathered])
    logits = torch.cat([t for _, _, t in gathered]) if teacher is not None else None
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    labels = torch.tensor([int(l) for l in data.labels])
    return cls[inverse], labels, None if logits is None else logits[inverse]


def _broadcast(tensor: torch.Tensor) -> None:
    if torch.distributed.get_world_size() > 1:
        buf = tensor.detach().to("cuda" if torch.distributed.get_backend() == "nccl" else "cpu").contiguous()
        torch.distributed.broadcast(buf, src=0)
        with torch.no_grad():
            tensor.copy_(buf.to(tensor.device))
