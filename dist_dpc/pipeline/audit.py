"""`dpc audit`: check the DP-SGD mechanism end to end with one extra training run.

White-box gradient canaries (Steinke, Nasr & Jagielski, NeurIPS 2023, section 6): the audit trains
a linear model whose input has one coordinate per canary that no other example touches. Canary i
is the input e_i with a target so large that its gradient always exceeds the clipping norm, so when
it is sampled its clipped gradient puts exactly C on weight i and nothing anywhere else; the other
N - m examples ("background") live on their own coordinates. Weight i therefore moves by its
canary's clipped contributions (if it was included and sampled) plus the noise of every step, and
its final value is the canary's score. Everything else is the user's recipe, run by the same code:
N, batch size, epochs (so q and the steps), the target epsilon (so sigma, from the same ledger and
accountant), clipping mode, sampling, optimizer, learning rate, ZeRO stage, precision, and the
ranks the audit is launched on. A bug in sampling, clipping, noise placement under ZeRO, the
reduction across ranks or the accounting shows up as a lower bound above the claimed epsilon.

The audit tree (run.name + "-audit") has its own ledger and is never released; it reads no private
example (only N, which is public). Results: RUN-audit/audit/audit.json, the printed summary, W&B.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import torch
from torch import nn

from dist_dpc.pipeline.config import Config, derived
from dist_dpc.pipeline.trainer import (PhaseContext, finish_phase, open_phase, open_tracker, phase_privacy,
                                       phase_directory, phase_results, planned_steps, steps_per_epoch, train_dp)
from dist_dpc.privacy.accounting import delta_default
from dist_dpc.privacy.audit import audit_lower_bound
from dist_dpc.utils.logging import log

AUDIT_PHASE = "audit"
BACKGROUND_FEATURES = 16
# The canary's target: its squared-error gradient 2 (w_i - y) has norm ~2e6, far above any clipping
# norm, so every sampled canary contributes exactly C (its whole clipped gradient) to weight i.
CANARY_TARGET = 1.0e6


class WhiteBoxCanaries:
    """The audit's task: examples are indices (background j < N - m, canary i at N - m + i), their
    features built per micro-batch; loss = squared error of a bias-free linear model."""

    name = "white_box_audit"

    def __init__(self, canaries: int, background: int, generator: np.random.Generator):
        self.canaries, self.background = canaries, background
        self.width = BACKGROUND_FEATURES + canaries
        self.features = torch.from_numpy(generator.standard_normal((background, BACKGROUND_FEATURES))
                                         / math.sqrt(BACKGROUND_FEATURES)).float()
        self.targets = torch.from_numpy(generator.standard_normal(background)).float()

    def model(self) -> nn.Module:
        model = nn.Linear(self.width, 1, bias=False)  # one DP layer: the canary gets all of C, not C / sqrt(L)
        nn.init.zeros_(model.weight)
        return model

    def collate(self, examples: list[int], pad_id: int = 0, num_rows: int | None = None) -> dict:
        rows = num_rows or len(examples)
        x, y, mask = torch.zeros(rows, self.width), torch.zeros(rows), torch.zeros(rows)
        for row, index in enumerate(examples):
            if index < self.background:
                x[row, :BACKGROUND_FEATURES], y[row] = self.features[index], self.targets[index]
            else:
                x[row, BACKGROUND_FEATURES + index - self.background], y[row] = 1.0, CANARY_TARGET
            mask[row] = 1.0
        return {"features": x, "targets": y, "sample_mask": mask, "attention_mask": torch.ones(rows, 1)}

    @staticmethod
    def loss(forward, batch: dict) -> torch.Tensor:
        weight_dtype = next(forward.parameters()).dtype
        prediction = forward(batch["features"].to(weight_dtype)).squeeze(-1).float()
        return (prediction - batch["targets"]) ** 2

    def scores(self, model: nn.Module) -> np.ndarray:
        return model.weight.detach().float().cpu().numpy()[0, BACKGROUND_FEATURES:]


def audit_config(cfg: Config) -> Config:
    """The audit tree's config: the user's, renamed, with the claimed epsilon of the audited phase as
    its whole target, no evaluation during training (there is nothing to evaluate)."""
    phase, privacy = cfg.audit.phase, cfg.privacy
    claimed = privacy.target_epsilon
    if phase == "teacher" and claimed is not None:
        claimed = privacy.target_epsilon * cfg.pipeline.cumulative_share("teacher")
    audit = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, name=f"{cfg.run.name}-audit"),
        privacy=dataclasses.replace(privacy, target_epsilon=claimed),
        train=dataclasses.replace(cfg.train, eval_every=0))
    return derived(audit, audit)


def run_audit(cfg: Config) -> dict:
    cfg = audit_config(cfg)
    m = cfg.audit.canaries
    done = phase_directory(cfg, AUDIT_PHASE) / "audit.json"
    if done.is_file():  # like a completed phase: not run again (its ledger would add a second run's spend)
        summary = json.loads(done.read_text())
        print(f"[audit] already done: epsilon_lb={summary['epsilon_lb']:.3f}, claimed epsilon="
              f"{summary['claimed_epsilon']} ({done}); delete {done.parent.parent} to audit again")
        return summary
    ctx = open_phase(cfg, AUDIT_PHASE)  # the audit tree; the private data is read for its size only
    n = ctx.train_size
    if m >= n:
        raise ValueError(f"audit.canaries={m} must be below the {n} training examples (the audit replaces m of the "
                         f"N examples by canaries, keeping N): use audit.canaries <= {n // 2}")
    generator = ctx.key.generator("audit")
    included = generator.random(m) < 0.5  # the coins: secret until the scores are in
    task = WhiteBoxCanaries(m, n - m, generator)
    examples = list(range(n - m)) + [n - m + i for i in np.flatnonzero(included)]
    # The engine sees the user's N (q = B / N); the set itself has N - m + (included canaries).
    ctx = dataclasses.replace(ctx, task=task, train_set=examples, eval_sets={}, public_train_size=n)
    model = task.model()
    steps = planned_steps(cfg.train.epochs, cfg.train.max_steps, steps_per_epoch(ctx))
    privacy = phase_privacy(ctx, steps)
    tracker = open_tracker(ctx)
    log(ctx.world, f"[audit] white-box: {m} canaries ({int(included.sum())} included), N={n}, {steps} steps")
    engine = train_dp(ctx, model, directory=ctx.directory, steps=steps, privacy=privacy, tracker=tracker,
                      loss_fn=task.loss, desc="audit")
    scores = _gathered_scores(engine, task)
    delta = engine.delta if cfg.privacy.enabled else delta_default(n)
    bound = audit_lower_bound(scores, included, delta, cfg.audit.confidence, cfg.audit.guess_fractions)
    results = phase_results(ctx, engine, {}, steps, audit=_audit_summary(cfg, engine, bound))
    tracker.summary({"audit/epsilon_lb": bound["epsilon_lb"], "audit/canaries": m,
                     "audit/confidence": cfg.audit.confidence})
    if ctx.is_main:
        ctx.run.write_json(ctx.directory / "audit.json", {**results["audit"], "inclusion": included.tolist(),
                                                          "scores": scores.tolist()})
    finish_phase(ctx, tracker, results, None)
    _print(ctx, results)
    return results


def _gathered_scores(engine, task: WhiteBoxCanaries) -> np.ndarray:
    import deepspeed

    params = list(engine.ds.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.ds.zero_optimization_stage() == 3):
        return task.scores(engine.ds.module)


def _audit_summary(cfg: Config, engine, bound: dict) -> dict:
    return {"kind": "white_box", **{k: v for k, v in bound.items()},
            "claimed_epsilon": engine.epsilon() if cfg.privacy.enabled else None,
            "audited_phase": cfg.audit.phase, "noise_multiplier": engine.noise_multiplier,
            "sample_rate": engine.sample_rate, "clipping": cfg.privacy.clipping if cfg.privacy.enabled else None,
            "zero_stage": engine.ds.zero_optimization_stage(), "world_size": engine.world.world_size,
            "bf16": cfg.train.bf16, "optimizer": cfg.train.optimizer}


def _print(ctx: PhaseContext, results: dict) -> None:
    a = results["audit"]
    claimed = "not private" if a["claimed_epsilon"] is None else f"{a['claimed_epsilon']:.3f}"
    lines = ["", "=" * 72, "privacy audit (white-box gradient canaries, one run)",
             f"empirical lower bound epsilon_lb = {a['epsilon_lb']:.3f} at {a['confidence']:.0%} confidence "
             f"(delta {a['delta']:.3g}); claimed epsilon = {claimed}",
             f"{a['canaries']} canaries, {a['included']} included; best test: {a['best_fraction']} of the canaries "
             "guessed (Bonferroni over " + ", ".join(str(t["fraction"]) for t in a["tests"]) + ")",
             f"settings: sigma={a['noise_multiplier']:.4f} q={a['sample_rate']:.5f} steps={results['steps']} "
             f"clipping={a['clipping']} zero_stage={a['zero_stage']} world={a['world_size']}"]
    if a["claimed_epsilon"] is not None and a["epsilon_lb"] > a["claimed_epsilon"]:
        lines.append("FAILED: the lower bound exceeds the claimed epsilon: the mechanism that ran is not the one "
                     "accounted for (or a 1-in-20 false alarm at 95 %): investigate before releasing anything")
    lines.append("=" * 72)
    log(ctx.world, "\n".join(lines))
