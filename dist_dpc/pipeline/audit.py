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

from dist_dpc.engine.deepspeed_seam import partitions_are_disjoint
from dist_dpc.pipeline.config import Config, derived
from dist_dpc.pipeline.trainer import (PhaseContext, finish_phase, gathered, open_phase, open_tracker,
                                       phase_directory, phase_privacy, phase_results, planned_steps, steps_per_epoch,
                                       train_dp)
from dist_dpc.privacy.accounting import Mechanism, delta_default
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
        cfg, run=dataclasses.replace(cfg.run, name=f"{cfg.run.name}-audit", overwrite=False),
        privacy=dataclasses.replace(privacy, target_epsilon=claimed),
        train=dataclasses.replace(cfg.train, eval_every=0))
    return derived(audit, audit)


def run_audit(cfg: Config) -> dict:
    cfg = audit_config(cfg)
    done = phase_directory(cfg, AUDIT_PHASE) / "audit.json"
    if done.is_file():  # like a completed phase: not run again (its ledger would add a second run's spend)
        summary = json.loads(done.read_text())
        print(f"[audit] already done: epsilon_lb={summary['epsilon_lb']:.3f}, claimed epsilon="
              f"{summary['claimed_epsilon']} ({done}); delete {done.parent.parent} to audit again")
        return summary
    return (run_white_box if cfg.audit.kind == "white_box" else run_black_box)(cfg)


def run_white_box(cfg: Config) -> dict:
    m = cfg.audit.canaries
    ctx = open_phase(cfg, AUDIT_PHASE, size_only=True)  # the private data is read for N alone
    _check_fdp_possible(ctx)
    n = ctx.train_size
    _check_canaries(m, n)
    included = _coins(ctx, m)
    task = WhiteBoxCanaries(m, n - m, ctx.key.generator("audit", "background"))
    examples = list(range(n - m)) + [n - m + i for i in np.flatnonzero(included)]
    # The engine sees the user's N (q = B / N); the set itself has N - m + (included canaries).
    ctx = dataclasses.replace(ctx, task=task, train_set=examples, eval_sets={}, public_train_size=n)
    model = task.model()
    steps = planned_steps(cfg.train.epochs, cfg.train.max_steps, steps_per_epoch(ctx))
    privacy = phase_privacy(ctx, steps)
    tracker = open_tracker(ctx)
    log(ctx.world, f"[audit] white-box: {m} canaries ({int(included.sum())} included), N={n}, {steps} steps")
    recorder = NoisyGradientRecorder(task.width)
    engine = train_dp(ctx, model, directory=ctx.directory, steps=steps, privacy=privacy, tracker=tracker,
                      loss_fn=task.loss, desc="audit", setup=recorder.attach)
    results = phase_results(ctx, engine, {}, steps)
    with gathered(engine):
        scores = {"final_weight": task.scores(engine.module)}
    if recorder.complete(steps):
        scores["likelihood_ratio"] = recorder.likelihood_ratio_scores(BACKGROUND_FEATURES)
    _conclude(ctx, engine, results, tracker, scores, included)
    finish_phase(ctx, tracker, results, None)
    _print(results)
    return results


class NoisyGradientRecorder:
    """Every step's released gradient (clipped sum + noise, over the expected batch size), as the
    optimizer receives it: a DP-engine post-noise hook on the optimizer's own tensors. For the audit
    model (one weight) the ranks' partitions in rank order are the flattened weight (plus padding)."""

    def __init__(self, width: int):
        self.width, self.steps, self.engine = width, {}, None

    def attach(self, engine) -> None:
        self.engine = engine
        engine.post_noise_hooks.append(self)

    def __call__(self, optimizer) -> None:
        grads = [p.grad.detach().float().flatten() for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        self.steps.setdefault(self.engine.steps_done, []).extend(g.cpu().clone() for g in grads)

    def complete(self, steps: int) -> bool:
        """A resumed audit recorded only the steps after its checkpoint: no per-step score then."""
        return sorted(self.steps) == list(range(steps))

    def likelihood_ratio_scores(self, offset: int) -> np.ndarray:
        """Per canary, sum over steps of log [(1 - q) + q exp((x_t - 1/2) / sigma^2)], x_t = -B g_t / C:
        the log-likelihood ratio of "included" against "excluded" under the claimed mechanism (the
        canary adds C, i.e. x = 1, when sampled, and the noise is N(0, sigma^2) in these units); under
        no noise, the plain sum of x_t. The most powerful statistic for the mechanism we claim."""
        engine = self.engine
        local = torch.stack([torch.cat(self.steps[t]) for t in sorted(self.steps)])  # (T, this rank's share)
        if torch.distributed.is_initialized() and partitions_are_disjoint(engine.ds):
            shares = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(shares, local)
            local = torch.cat(shares, dim=1)
        g = local[:, offset:self.width].double().numpy()
        privacy, q = engine.privacy, engine.sample_rate
        x = -engine.expected_batch_size * g / privacy.max_grad_norm
        sigma = engine.noise_multiplier
        if engine.clipper is None or sigma == 0:
            return x.sum(0)
        return np.logaddexp(math.log1p(-q), math.log(q) + (x - 0.5) / sigma ** 2).sum(0)


def _coins(ctx: PhaseContext, m: int) -> np.ndarray:
    """Each canary's inclusion, drawn once per audit tree and kept in it: a resumed audit (a fresh key
    in secure mode) scores the canaries it trained on, not a new draw."""
    path = ctx.directory / "coins.json"
    exists = path.is_file()
    torch.distributed.barrier()  # every rank has looked before rank 0 may write
    if exists:
        coins = np.asarray(json.loads(path.read_text()), dtype=bool)
        if len(coins) != m:
            raise ValueError(f"{path} holds {len(coins)} coins but audit.canaries={m}: delete {path.parent.parent} "
                             "to start the audit again")
        return coins
    coins = ctx.key.generator("audit", "coins").random(m) < 0.5  # identical on every rank (one key)
    if ctx.is_main:
        ctx.run.write_json(path, coins.tolist())
    return coins


def run_black_box(cfg: Config) -> dict:
    """The config's own model, phase recipe and private data (run_train in the audit tree), plus the
    included canaries; score = the canary's loss under the starting model minus under the trained one."""
    from dist_dpc.pipeline.trainer import run_train

    m, state = cfg.audit.canaries, {}

    def prepare(ctx: PhaseContext) -> PhaseContext:
        _check_fdp_possible(ctx)
        if cfg.audit.synthetic_samples and not ctx.task.generates:
            raise ValueError(f"audit.synthetic_samples needs a causal LM (model.task=causal_lm); model.task="
                             f"{ctx.task.name!r} writes no text: set audit.synthetic_samples=0")
        n = ctx.train_size
        _check_canaries(m, n)
        included = _coins(ctx, m)
        split = ctx.task.audit_canaries(ctx.key.generator("audit", "canaries"), m, ctx.num_labels)
        if cfg.audit.synthetic_samples and split.prefixes:
            # A secret in synthetic text is a private record the model learned to write, prefix and all:
            # here the prefix carries loss too, or the model would never start a sample with it.
            split = dataclasses.replace(split, texts=[p + t for p, t in zip(split.prefixes, split.texts)],
                                        prefixes=None)
        canaries = ctx.task.tokenize(split, ctx.tokenizer, None, train=True)
        start = ctx.task.load_model(cfg.model, ctx.tokenizer, num_labels=ctx.num_labels, label_names=ctx.label_names,
                                    seed=cfg.run.seed)  # the model training starts from (same seed)
        state.update(included=included, canaries=canaries, texts=split.texts,
                     before=canary_losses(ctx.task, start, canaries, ctx.tokenizer.pad_token_id))
        log(ctx.world, f"[audit] black-box: {m} canaries ({int(included.sum())} included) among N={n}")
        train = _Joined(ctx.train_set, [canaries[i] for i in np.flatnonzero(included)])
        return dataclasses.replace(ctx, train_set=train, public_train_size=n)  # q = B / N: the user's N

    def before_finish(ctx: PhaseContext, engine, results: dict, tracker) -> None:
        after = canary_losses(ctx.task, engine.ds.module, state["canaries"], ctx.tokenizer.pad_token_id)
        synthetic = None
        if cfg.audit.synthetic_samples:
            from dist_dpc.pipeline.audit_synthetic import synthetic_exposure

            synthetic = synthetic_exposure(ctx, engine.ds.module, state["texts"], state["included"],
                                           engine.ds.zero_optimization_stage())
        _conclude(ctx, engine, results, tracker, state["before"] - after, state["included"], kind="black_box",
                  synthetic=synthetic)

    results = run_train(cfg, phase=AUDIT_PHASE, prepare=prepare, before_finish=before_finish)
    _print(results)
    return results


class _Joined:
    """The private training set followed by the included canaries (indexable, sized)."""

    def __init__(self, first, second: list):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, i: int):
        return self.first[i] if i < len(self.first) else self.second[i - len(self.first)]

    @property
    def labels(self) -> list[int]:
        """Classification labels in order (head_init's DP probe reads them)."""
        return [*self.first.labels, *(item["labels"] for item in self.second)]


@torch.no_grad()
def canary_losses(task, model: nn.Module, canaries, pad_token_id: int, batch_size: int = 32) -> np.ndarray:
    """Each canary's loss under ``model`` (the task's per-sample training loss), on every rank (ZeRO-3
    gathers its parameters in the forward)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(canaries), batch_size):
        batch = task.collate([canaries[j] for j in range(i, min(i + batch_size, len(canaries)))], pad_token_id)
        out.append(task.loss(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
                   .float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy().astype(np.float64)


def _check_canaries(m: int, n: int) -> None:
    if m >= n:
        raise ValueError(f"audit.canaries={m} must be below the {n} training examples (the white-box audit replaces m "
                         f"of the N examples by canaries, keeping N): use audit.canaries <= {n // 2}")


def _conclude(ctx: PhaseContext, engine, results: dict, tracker, scores, included: np.ndarray,
              kind: str = "white_box", synthetic: tuple[dict, np.ndarray] | None = None) -> None:
    """The bound from the scores and the coins, into results.json, audit.json and W&B; with
    ``synthetic`` = (summary, text-only scores), the same test on the text-only scores too."""
    cfg = ctx.cfg
    delta = engine.delta if cfg.privacy.enabled else delta_default(ctx.train_size)
    mechanisms = audited_mechanisms(cfg, engine, results["steps"]) if cfg.audit.test == "f_dp" else None

    def bound_of(values):
        return audit_lower_bound(values, included, delta, cfg.audit.confidence, cfg.audit.guess_fractions,
                                 test=cfg.audit.test, mechanisms=mechanisms)

    bound = bound_of(scores)
    results["audit"] = {**_audit_summary(cfg, engine, bound, kind), "steps": results["steps"]}
    if synthetic is not None:
        summary, text_scores = synthetic
        text_bound = bound_of(text_scores)
        synthetic = {**summary, "epsilon_lb": text_bound["epsilon_lb"], "ceiling": text_bound["ceiling"],
                     "tests": text_bound["tests"], "scores": text_scores.tolist()}
        results["audit"]["synthetic"] = {k: v for k, v in synthetic.items() if k != "scores"}
        tracker.summary({"audit/synthetic_epsilon_lb": text_bound["epsilon_lb"],
                         "audit/synthetic_secrets_whole_included": summary["secrets_whole_included"]})
    tracker.summary({"audit/epsilon_lb": bound["epsilon_lb"], "audit/canaries": bound["canaries"],
                     "audit/confidence": cfg.audit.confidence, "audit/kind": kind})
    if ctx.is_main:
        by_name = scores if isinstance(scores, dict) else {"score": scores}
        ctx.run.write_json(ctx.directory / "audit.json",
                           {**results["audit"], "inclusion": included.tolist(),
                            "scores": {name: np.asarray(v).tolist() for name, v in by_name.items()},
                            **({"synthetic": synthetic} if synthetic is not None else {})})


def _check_fdp_possible(ctx: PhaseContext) -> None:
    """Before training: the f-DP test needs every mechanism of the audit tree as (sigma, q, steps)."""
    if ctx.cfg.audit.test == "f_dp" and ctx.ledger is not None and not all(
            isinstance(m, Mechanism) for m in ctx.ledger.mechanisms()):
        raise ValueError("audit.test=f_dp: the audit tree's ledger holds an RDP-only curve (dpc tune, or a model "
                         "whose lineage has one), which has no trade-off curve here: use audit.test=one_run")


def audited_mechanisms(cfg: Config, engine, steps: int) -> list[Mechanism]:
    """What the f-DP test scales: the audit tree's mechanisms as its accountant composes them (head_init's
    included in a black-box audit), or, without privacy, DP-SGD at the run's q and steps."""
    if not cfg.privacy.enabled or not engine.noise_multiplier:
        return [Mechanism(1.0, engine.sample_rate, steps)]
    held = [*engine.accountant.prior, *engine.accountant.history]
    if not all(isinstance(m, Mechanism) for m in held):
        raise ValueError("audit.test=f_dp needs every mechanism of the audit tree as (sigma, q, steps); an RDP-only "
                         "curve (dpc tune) has no trade-off curve here: use audit.test=one_run")
    return held


def _audit_summary(cfg: Config, engine, bound: dict, kind: str) -> dict:
    return {"kind": kind, **bound,
            "claimed_epsilon": engine.epsilon() if cfg.privacy.enabled else None,
            "audited_phase": cfg.audit.phase, "noise_multiplier": engine.noise_multiplier,
            "sample_rate": engine.sample_rate, "clipping": cfg.privacy.clipping if cfg.privacy.enabled else None,
            "zero_stage": engine.ds.zero_optimization_stage(), "world_size": engine.world.world_size,
            "bf16": cfg.train.bf16, "optimizer": cfg.train.optimizer}


def _print(results: dict) -> None:
    a = results["audit"]
    claimed = "not private" if a["claimed_epsilon"] is None else f"{a['claimed_epsilon']:.3f}"
    what = "white-box gradient canaries" if a["kind"] == "white_box" else "black-box input canaries"
    how = "f-DP test, Mahloujifar et al." if a.get("test") == "f_dp" else "(epsilon, delta) test, Steinke et al."
    lines = ["", "=" * 72, f"privacy audit ({what}, one run, {how})",
             f"empirical lower bound epsilon_lb = {a['epsilon_lb']:.3f} at {a['confidence']:.0%} confidence "
             f"(delta {a['delta']:.3g}); claimed epsilon = {claimed}" +
             ("; f-DP: below epsilon_lb, the canaries show the run leaks more than DP-SGD at its q and steps would"
              if a.get("test") == "f_dp" else ""),
             f"{a['canaries']} canaries, {a['included']} included; best test: {a['best_score']}, "
             f"{a['best_fraction']} of the canaries guessed (Bonferroni over {len(a['tests'])} tests); "
             f"the most this audit can show: {a['ceiling']:.2f}",
             f"settings: sigma={a['noise_multiplier']:.4f} q={a['sample_rate']:.5f} steps={a['steps']} "
             f"clipping={a['clipping']} zero_stage={a['zero_stage']} world={a['world_size']}"]
    if a["claimed_epsilon"] is not None and (a["epsilon_lb"] > a["claimed_epsilon"] or a.get("claim_rejected")):
        lines.append("FAILED: the canaries reject the accounted mechanism (epsilon_lb above the claim, or the claimed "
                     "trade-off curve itself rejected): the mechanism that ran is not the one accounted for (or a false "
                     f"alarm, at most 1 run in {round(1 / (1 - a['confidence']))}): investigate before releasing anything")
    elif a["claimed_epsilon"] is not None and a["claimed_epsilon"] >= a["ceiling"]:
        lines.append(f"NOTE: the claimed epsilon is at or above what {a['canaries']} canaries can show "
                     f"({a['ceiling']:.2f}): this audit cannot flag a leak at this epsilon; use more canaries")
    if a.get("synthetic"):
        sy = a["synthetic"]
        lines.append(f"synthetic text ({sy['samples']} samples from the audit model): whole secrets of "
                     f"{sy['secrets_whole_included']} included and {sy['secrets_whole_excluded']} excluded canaries "
                     f"appear; longest run of a secret's digits {sy['longest_run_included_mean']:.2f} (included) vs "
                     f"{sy['longest_run_excluded_mean']:.2f} (excluded) on average; epsilon_lb from the text alone "
                     f"= {sy['epsilon_lb']:.3f}")
    lines.append("=" * 72)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        print("\n".join(lines), flush=True)
