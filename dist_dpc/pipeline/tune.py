"""`dpc tune`: hyper-parameter selection that is itself accounted (docs/tuning.md).

private (Papernot & Steinke, ICLR 2022). The training set is split (data.seed) into a training part
and a private holdout. One trial = a candidate drawn at random from tune.search's grid, DP-SGD on the
training part at that candidate's calibrated sigma, and a DP score: the count of correct holdout
predictions plus N(0, score_noise_multiplier^2). K ~ D_{eta,gamma} trials run (K is secret), the best
score wins, and only the winner is released (RUN/tune/model, selected values, its noisy score). The
ledger gets the selection's RDP curve (dist_dpc.privacy.selection) before any trial reads the data.
Every candidate's sigma is calibrated so that its trial's RDP curve stays under one common curve,
which the theorem needs; after each trial its own ledger is checked against that curve.

Trials run in RUN/tune/.trials (0700) with their output (stdout, stderr, W&B) kept there and deleted
with them: the number of trials and the losing trials' results are not released.

public_proxy. Every candidate is trained (DP-SGD, the tree's privacy settings) on the public data set
named by tune.proxy_data and scored on that set's evaluation split. No private example is used (N is
read, which is public); the
ledger records the declaration (entry ``public_proxy:...``, no mechanism) and all trials' scores are
released.

Later phases of the tree apply the selected values (``apply_selection``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dist_dpc.models import ModelConfig
from dist_dpc.pipeline.config import Config, derived
from dist_dpc.pipeline.trainer import (PhaseContext, PhaseRunningError, _from_rank0, _hold_phase_lock,
                                       local_device, open_phase, planned_steps, root_of, run_train)
from dist_dpc.tasks import make_task
from dist_dpc.privacy.accounting import (MAX_SIGMA, Mechanism, RdpCurve, calibrate_noise_multiplier,
                                         compute_epsilon, epsilon_from_rdp, rdp_of, rdp_orders)
from dist_dpc.privacy.ledger import RELATIVE_SLACK, PrivacyBudgetExceeded
from dist_dpc.privacy.selection import expected_trials, gamma_for_mean, sample_trials, selection_rdp
from dist_dpc.utils.config_loader import build, to_dict
from dist_dpc.utils.logging import log

SELECTION_FILE = "results.json"


# -- configs ----------------------------------------------------------------------------------------
def with_values(cfg: Config, values: dict) -> Config:
    """``cfg`` with ``{section.key: value}`` set (validated like any config)."""
    data = to_dict(cfg)
    for key, value in values.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    return derived(cfg, build(Config, data))


def apply_selection(cfg: Config, phase: str) -> Config:
    """A training phase of a tree whose `dpc tune` completed runs with the selected values."""
    path = root_of(cfg) / "tune" / SELECTION_FILE
    if phase == "tune" or not path.is_file():
        return cfg
    selected = json.loads(path.read_text())["selected"]
    print(f"[{phase}] tuned values from {path.parent}: " + ", ".join(f"{k}={v}" for k, v in selected.items()),
          flush=True)
    return with_values(cfg, selected)


def _check_candidates(cfg: Config, candidates: list[dict]) -> None:
    for values in candidates:
        if "model.task" in values:
            raise ValueError("tune.search: model.task is fixed (it changes the data, the loss and the score); tune "
                             "within one task")
        try:
            with_values(cfg, values)
        except (ValueError, TypeError) as err:
            raise ValueError(f"tune.search: the candidate {values} is not a valid config: {err}") from err


# -- calibration ------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrialPlan:
    values: dict
    sample_rate: float
    steps: int  # DP-SGD steps at the trial's sigma: head_init's probe steps included
    fixed: tuple[Mechanism, ...] = ()  # head_init's DP mean (a fixed sigma), when the trial runs it
    noise_multiplier: float = math.nan

    def mechanisms(self, noise_multiplier: float) -> list[Mechanism]:
        return [*self.fixed, Mechanism(noise_multiplier, self.sample_rate, self.steps)]


def plan_trials(cfg: Config, candidates: list[dict], train_size: int,
                bert_style: Callable[[Config], bool],
                hidden_size: Callable[[Config], int] | None = None) -> list[TrialPlan]:
    """Each candidate's trial as run_train will run it: its DP-SGD steps, and head_init's probe steps
    and DP mean where its settings (resolved for the candidate's model: ``bert_style``) run them."""
    from dist_dpc.pipeline.head_init import head_init_cost

    plans = []
    for values in candidates:
        c = with_values(cfg, values)
        if c.train.batch_size >= train_size:
            raise ValueError(f"tune.search candidate {values}: train.batch_size={c.train.batch_size} is not below the "
                             f"{train_size} training examples left after the holdout")
        per_epoch = math.ceil(train_size / c.train.batch_size)
        steps = planned_steps(c.train.epochs, c.train.max_steps, per_epoch)
        h = c.head_init
        if h.centre_pooler is not False or h.probe_epochs != 0:  # (else nothing to resolve: no model load)
            try:
                h = h.resolved(bert_style(c), c.model.name, dataset_size=train_size,
                               hidden_size=hidden_size(c) if hidden_size is not None else None)
            except ValueError as err:
                raise ValueError(f"tune.search candidate {values}: {err}") from None
        probe, fixed = head_init_cost(h, per_epoch, private=True, phase="train")
        plans.append(TrialPlan(values, c.train.batch_size / train_size, steps + probe, fixed))
    return plans


def score_rdp(score_noise_multiplier: float) -> np.ndarray:
    """The Gaussian mechanism on a count (sensitivity 1): RDP alpha / (2 sigma^2)."""
    return np.asarray(rdp_orders()) / (2 * score_noise_multiplier ** 2)


def calibrate_trials(plans: list[TrialPlan], *, epsilon: float, delta: float, eta: float, gamma: float,
                     score_noise_multiplier: float, prior_rdp=None) -> np.ndarray:
    """Set every plan's sigma so that the selection over them, composed with ``prior_rdp`` (what the
    tree spent before; default nothing), costs ``epsilon`` at ``delta``; returns the common per-trial
    RDP curve (each trial's DP-SGD and score lie under it, order by order).

    Each candidate is calibrated (RDP accountant) to the same per-trial epsilon e; the common curve is
    the order-wise maximum of the candidates' curves; e is bisected until the selection's epsilon
    (Theorem 2 of Papernot & Steinke, then the RDP -> (epsilon, delta) conversion) meets ``epsilon``."""
    score = score_rdp(score_noise_multiplier)
    prior = np.zeros(len(rdp_orders())) if prior_rdp is None else np.asarray(prior_rdp, dtype=float)

    def curve_at(e: float) -> np.ndarray:
        curves = []
        for p in plans:
            p.noise_multiplier = calibrate_noise_multiplier(e, delta, p.sample_rate, p.steps, accountant="rdp",
                                                            prior=p.fixed)
            curves.append(rdp_of(p.mechanisms(p.noise_multiplier)))
        return np.max(curves, axis=0) + score

    def cost(e: float) -> float:
        return epsilon_from_rdp(prior + selection_rdp(curve_at(e), eta, gamma), delta)

    floor = epsilon_from_rdp(prior + selection_rdp(score, eta, gamma), delta)
    if floor >= epsilon:
        raise ValueError(f"tune's epsilon {epsilon:g} is unreachable: what the tree spent before, the scores "
                         f"(score_noise_multiplier="
                         f"{score_noise_multiplier:g}) and the selection over E[K]={expected_trials(eta, gamma):.3g} "
                         f"trials already cost {floor:.3g}. Raise tune.epsilon, tune.score_noise_multiplier, or lower "
                         "tune.expected_trials")
    # The smallest per-trial epsilon calibration can reach (sigma <= MAX_SIGMA) for every candidate.
    lo = max(1e-3, *(1.01 * compute_epsilon(p.mechanisms(MAX_SIGMA), delta, "rdp")
                     for p in plans))
    hi = max(epsilon, 2 * lo)
    if cost(lo) > epsilon:
        raise ValueError(f"tune's epsilon {epsilon:g} is unreachable for this search: even trials at epsilon {lo:g} "
                         "each cost more. Raise tune.epsilon or lower tune.expected_trials")
    for _ in range(40):  # geometric bisection on the per-trial epsilon
        mid = math.sqrt(lo * hi)
        if cost(mid) <= epsilon:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.002:
            break
    return curve_at(lo)


# -- trials -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet(log_file: Path):
    """Everything the process writes (Python, DeepSpeed's handlers, C code) goes to ``log_file``:
    a trial's output (its number, its candidate, its accuracy) is not released."""
    _flush_all()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.dup2(fd, 1), os.dup2(fd, 2)
        try:
            yield
        except BaseException:
            import traceback

            traceback.print_exc()  # into the private log: what the refusal message points the user to
            raise
    finally:
        _flush_all()  # C-level buffers too: a trial's buffered output must not reach the real stdout
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def _flush_all() -> None:
    import ctypes

    sys.stdout.flush(), sys.stderr.flush()
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # pragma: no cover (no libc symbol table)
        pass


def _trial_config(cfg: Config, values: dict, *, directory: Path, name: str, privacy: dict, data: dict,
                  noise_seed: int | None = None) -> Config:
    c = with_values(cfg, values)
    d = to_dict(c)
    d["run"].update(output_dir=str(directory), name=name, overwrite=False)
    d["privacy"].update(privacy)
    d["data"].update(data)
    d["wandb"]["mode"] = "disabled"
    d["pipeline"]["phases"] = ["teacher"]
    d["pipeline"]["budget_split"] = {}
    if d["privacy"].get("randomness") == "insecure_reproducible":
        # Each trial its own stream, and each attempt of the selection its own (``noise_seed``
        # comes from the attempt's key): a re-run never replays an earlier attempt's noise.
        d["privacy"]["noise_seed"] = noise_seed
        if noise_seed is None and cfg.privacy.noise_seed is not None:
            import hashlib  # (public proxy: Python's hash() differs between processes)

            digest = hashlib.blake2b(f"{cfg.privacy.noise_seed}:{name}".encode(), digest_size=8).digest()
            d["privacy"]["noise_seed"] = int.from_bytes(digest, "little") & (2**62 - 1)
    return build(Config, d)  # a run tree of its own: its config is this one


# -- private selection ------------------------------------------------------------------------------
def run_tune(cfg: Config) -> dict:
    t = cfg.tune
    if not t.search:
        raise ValueError("tune.search is empty: name the config keys to tune and their candidates, e.g. "
                         "tune.search='{train.lr: [2.0e-4, 5.0e-4, 1.0e-3]}'")
    make_task(cfg.model, cfg.data).refuse_unsupported("tune")
    candidates = t.candidates()
    _check_candidates(cfg, candidates)
    return _tune_public(cfg, candidates) if t.mode == "public_proxy" else _tune_private(cfg, candidates)


def _tune_private(cfg: Config, candidates: list[dict]) -> dict:
    t, privacy = cfg.tune, cfg.privacy
    if not privacy.enabled or privacy.target_epsilon is None:
        raise ValueError("tune.mode=private selects under differential privacy: it needs privacy.enabled=true and "
                         "privacy.target_epsilon (the tree's total). Without privacy, tune on public data "
                         "(tune.mode=public_proxy)")
    cfg = derived(cfg, dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, holdout_fraction=t.holdout_fraction)))
    ctx = open_phase(cfg, "tune")
    ledger, world = ctx.ledger, ctx.world
    # What the trials start from is part of the tree: its privacy cost comes in before anything runs.
    from dist_dpc.pipeline.lineage import import_lineage

    for name in dict.fromkeys(with_values(cfg, v).model.name for v in candidates):
        import_lineage(ctx, name, role="model.name")
    target = privacy.target_epsilon * cfg.pipeline.cumulative_share("tune")
    budget = t.epsilon if t.epsilon is not None else target / 2 if "tune" not in cfg.pipeline.phases else None
    probe = _bert_style_probe(ctx)
    plans = plan_trials(cfg, candidates, ctx.train_size, probe, probe.hidden_size)
    gamma = gamma_for_mean(t.eta, t.expected_trials)
    chosen: dict = {}

    def plan(others, previous):
        # tune.epsilon (or half the target for `dpc tune` alone): the selection's own epsilon; as a
        # phase of pipeline.phases: its cumulative share, composed with what the tree spent before.
        eps, prior = (budget, None) if budget is not None else (target, rdp_of(others))
        if previous is not None and previous == reservation_of(None):
            curve = np.asarray(previous["trial_rdp"])
            for p, sigma in zip(plans, previous["noise_multipliers"]):
                p.noise_multiplier = sigma  # a resumed attempt keeps its calibration
        else:
            curve = calibrate_trials(plans, epsilon=eps, delta=ledger.delta, eta=t.eta, gamma=gamma,
                                     score_noise_multiplier=t.score_noise_multiplier, prior_rdp=prior)
        limit = privacy.max_effective_noise
        for p in plans:  # the trials' own check, made before anything is reserved
            batch = p.sample_rate * ctx.train_size
            if limit is not None and p.noise_multiplier / batch > limit:
                raise ValueError(f"tune: candidate {p.values} would train with noise_multiplier={p.noise_multiplier:.4g} "
                                 f"at batch {batch:g}: noise {p.noise_multiplier / batch:.3g} x max_grad_norm per "
                                 f"coordinate, above privacy.max_effective_noise={limit:g}. Give the selection more "
                                 "epsilon, fewer expected trials, larger batches or fewer steps")
        chosen["curve"] = curve
        return [RdpCurve(tuple(selection_rdp(curve, t.eta, gamma)), "private selection", "tune")]

    def reservation_of(curve) -> dict:
        """Everything the stored curve was computed for: a resumed attempt reuses it only if all match."""
        out = {"search": candidates, "eta": t.eta,
               "plans": [[p.sample_rate, p.steps, [[m.noise_multiplier, m.sample_rate, m.steps] for m in p.fixed]] for p in plans],
               "gamma": gamma, "score_noise_multiplier": t.score_noise_multiplier}
        if curve is None:
            return {**out, **{k: v for k, v in (previous_reservation or {}).items()
                              if k in ("trial_rdp", "noise_multipliers")}}
        return {**out, "trial_rdp": [float(v) for v in curve], "noise_multipliers": [p.noise_multiplier for p in plans]}

    def reservation():
        return reservation_of(chosen["curve"])

    latest = ledger.latest_attempt("tune")
    previous_reservation = ledger.entry(latest).get("reservation") if latest else None
    outcome = None
    if ctx.is_main:
        try:
            _hold_phase_lock(ctx)
            entry = ledger.reserve("tune", plan, reservation)
            outcome = ("ok", entry)
        except (ValueError, PrivacyBudgetExceeded, PhaseRunningError) as err:
            outcome = ("refused", type(err).__name__, str(err))
    outcome = _from_rank0(outcome)
    if outcome[0] != "ok":
        raise (PrivacyBudgetExceeded if outcome[1] == "PrivacyBudgetExceeded" else ValueError)(outcome[2])
    entry = outcome[1]
    stored = ledger.entry(entry)["reservation"]
    curve = np.asarray(stored["trial_rdp"])
    for p, sigma in zip(plans, stored["noise_multipliers"]):
        p.noise_multiplier = float(sigma)
    eta, gamma, score_sigma = float(stored["eta"]), float(stored["gamma"]), float(stored["score_noise_multiplier"])
    key = ctx.key.derive("attempt", int(ledger.entry(entry).get("attempt", 1)))
    rng = key.generator("trials")
    trials = sample_trials(eta, gamma, rng)  # secret: never printed or written
    log(world, f"[tune] private selection over {len(candidates)} candidates ({', '.join(sorted(cfg.tune.search))}): "
               f"E[K]={t.expected_trials:g} trials (eta={eta:g}); each trial's sigma calibrated so that the selection "
               f"costs epsilon={epsilon_from_rdp(selection_rdp(curve, eta, gamma), ledger.delta):.3f}. The number of "
               "trials and the losing trials' results are secret: their output goes to RUN/tune/.trials and is deleted")
    scratch = ctx.directory / ".trials"
    if ctx.is_main:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700, parents=True)
    torch.distributed.barrier()
    n_holdout = ctx.public_holdout_size  # public: the true holdout size depends on the data
    best = None
    for k in range(trials):
        p = plans[int(rng.integers(len(plans)))]
        name = f"trial-{k}"
        try:
            with _quiet(scratch / "trials.log"):
                trial_cfg = _trial_config(cfg, p.values, directory=scratch, name=name,
                                          privacy={"noise_multiplier": p.noise_multiplier, "target_epsilon": None,
                                                   "delta": ledger.delta},
                                          data={"holdout_fraction": t.holdout_fraction},
                                          noise_seed=key.seed64("trial", k))
                run_train(trial_cfg, phase="train", evaluate_splits=False)
                trial_dir = scratch / name
                _check_trial(trial_dir, curve, score_rdp(score_sigma))
                correct = _correct(trial_dir / "model", cfg, ctx, ctx.holdout_set)
                _release_trial_lock(trial_dir)
                gc.collect()
        except Exception:
            # Which trial failed, and with which candidate, would tell K's lower bound and more: the
            # message says neither (the traceback is in RUN/tune/.trials/trials.log, which is private).
            raise RuntimeError("a `dpc tune` trial failed; its traceback is in RUN/tune/.trials/trials.log (private: "
                               "it names the trial). Nothing was released; the ledger keeps the reservation") from None
        noisy = (correct + float(rng.normal(0.0, score_sigma))) / n_holdout
        if best is None or noisy > best[0]:
            if best is not None and ctx.is_main:
                shutil.rmtree(best[2], ignore_errors=True)
            best = (noisy, p, trial_dir)
        elif ctx.is_main:
            shutil.rmtree(trial_dir, ignore_errors=True)
    noisy, p, trial_dir = best
    model_dir = ctx.directory / "model"
    results = {"phase": "tune", "mode": "private", "private": True, "search": cfg.tune.search,
               "candidates": len(candidates), "selected": p.values, "holdout_accuracy_noisy": noisy,
               "holdout_examples": n_holdout, "score_noise_multiplier": score_sigma,
               "expected_trials": t.expected_trials, "eta": eta, "gamma": gamma,
               "trial_noise_multipliers": {json.dumps(q.values, sort_keys=True): q.noise_multiplier for q in plans},
               "dataset_size": ledger.dataset_size, "delta": ledger.delta, "ledger_entry": entry}
    if ctx.is_main:
        ledger.release(entry, [RdpCurve(tuple(selection_rdp(curve, eta, gamma)), "private selection", "tune")])
        ledger.complete(entry)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.move(str(trial_dir / "model"), str(model_dir))
        _touch_tree(model_dir)  # file times would tell when the winner was trained, hence its index
        from dist_dpc.pipeline.lineage import write_lineage

        write_lineage(model_dir, ledger, phase="tune")
        shutil.rmtree(scratch, ignore_errors=True)
        results["epsilon_selection"] = epsilon_from_rdp(selection_rdp(curve, eta, gamma), ledger.delta)
        results["epsilon"] = ledger.total_epsilon()
        ctx.run.write_json(ctx.directory / SELECTION_FILE, results)
        _track(ctx, results)
        log(world, f"[tune] selected {p.values} (noisy holdout accuracy {noisy * 100:.2f} % on {n_holdout} examples, "
                   f"noise sigma {score_sigma:g} counts); selection epsilon "
                   f"{results['epsilon_selection']:.3f}, run tree total {results['epsilon']:.3f} "
                   f"(delta {ledger.delta:.3g}). Later phases of {ctx.run.path} apply these values")
    torch.distributed.barrier()
    return results


def _bert_style_probe(ctx: PhaseContext) -> Callable[[Config], bool]:
    """Whether a candidate's model is a BERT-style classifier (head_init's default runs for those):
    each model.name is instantiated once, untrained (the architecture is public)."""
    from dist_dpc.models.heads import has_pooled_head

    seen: dict[str, tuple[bool, int | None]] = {}

    def look(c: Config) -> tuple[bool, int | None]:
        if c.model.name not in seen:
            model = ctx.task.load_model(c.model, ctx.tokenizer, num_labels=ctx.num_labels, label_names=None,
                                        seed=c.run.seed)
            seen[c.model.name] = (has_pooled_head(model), getattr(model.config, "hidden_size", None))
            del model
        return seen[c.model.name]

    def bert_style(c: Config) -> bool:
        return look(c)[0]

    bert_style.hidden_size = lambda c: look(c)[1]  # the width head_init's default DP mean is scaled by
    return bert_style


def _check_trial(trial_dir: Path, curve: np.ndarray, score: np.ndarray) -> None:
    """A trial's own DP-SGD (its ledger's ``train`` entry; an imported model.name is the tree's, not
    the trial's) plus its score spend no more than the curve the selection was accounted with."""
    from dist_dpc.privacy.accounting import mechanism_from_dict

    ledger = json.loads((trial_dir / "privacy_ledger.json").read_text())
    own = [mechanism_from_dict(m) for name, e in ledger["phases"].items() if e.get("phase", name) == "train"
           for m in e["mechanisms"]]
    spent = rdp_of(own) + score
    if not own or np.any(spent > curve * (1 + RELATIVE_SLACK) + 1e-12):
        raise RuntimeError(f"a tune trial spent more than its accounted RDP curve ({trial_dir}): this is a bug; "
                           "the selection was stopped before releasing anything")


# -- public proxy -----------------------------------------------------------------------------------
def _tune_public(cfg: Config, candidates: list[dict]) -> dict:
    t = cfg.tune
    proxy = {**to_dict(cfg.data), **t.proxy_data, "holdout_fraction": 0.0}
    if _same_source(proxy, to_dict(cfg.data)):
        raise ValueError("tune.proxy_data names the private training data itself (data.task/data_dir/train_file): "
                         "a public proxy must be another, public data set")
    ctx = open_phase(cfg, "tune", load_data=False)
    scratch = ctx.directory / "trials"
    rows = []
    for i, values in enumerate(candidates):
        name = f"candidate-{i}"
        trial_cfg = _trial_config(cfg, values, directory=scratch, name=name, privacy={"delta": None}, data=proxy)
        done = scratch / name / "results.json"
        if done.is_file():  # a re-run resumes: finished candidates are not trained again
            result = json.loads(done.read_text())
        else:
            log(ctx.world, f"[tune] public proxy: candidate {i + 1}/{len(candidates)}: {values}")
            result = run_train(trial_cfg, phase="train")
        score = next(iter(result["metrics"].values()))["accuracy"] if result["metrics"] else math.nan
        rows.append({"values": values, "proxy_accuracy": score, "epsilon_on_proxy": result.get("epsilon")})
    best = max(rows, key=lambda r: r["proxy_accuracy"])
    declaration = "public_proxy:" + json.dumps(t.proxy_data, sort_keys=True)
    if ctx.is_main and ctx.ledger is not None:
        try:
            ctx.ledger.record(declaration, [], status="completed")
        except ValueError:
            pass  # the same declaration is already there
    results = {"phase": "tune", "mode": "public_proxy", "private": False, "search": t.search,
               "candidates": len(candidates), "proxy_data": t.proxy_data, "trials": rows, "selected": best["values"],
               "proxy_accuracy": best["proxy_accuracy"], "epsilon_selection": 0.0,
               "epsilon": ctx.ledger.total_epsilon() if ctx.ledger is not None else None}
    if ctx.is_main:
        ctx.run.write_json(ctx.directory / SELECTION_FILE, results)
        _track(ctx, results)
        log(ctx.world, f"[tune] selected {best['values']} on the public proxy ({best['proxy_accuracy'] * 100:.2f} %); "
                       "no private example was used. Later phases of the tree apply these values")
    torch.distributed.barrier()
    return results


def _training_source(data: dict):
    """What a data config trains on: the training file's content hash, or the generator's settings."""
    import hashlib

    task = data.get("task")
    if task == "synthetic_sentiment":
        return ("synthetic", data.get("seed"), data.get("synthetic_size"))
    path = None
    if data.get("train_file"):
        path = Path(data["train_file"])
    elif data.get("data_dir"):
        base = Path(data["data_dir"])
        if task == "yelp":
            path = next((base / n for n in ("train.csv", "dev.csv") if (base / n).is_file()), None)
        else:
            from dist_dpc.data.glue import GLUE, task_dir

            try:
                path = task_dir(task, str(base)) / "train.tsv" if task in GLUE else None
            except FileNotFoundError:
                path = None
    if path is None or not path.is_file():
        return ("unresolved", task, data.get("data_dir"), data.get("train_file"))
    return ("file", hashlib.sha256(path.read_bytes()).hexdigest())


def _same_source(proxy: dict, private: dict) -> bool:
    return _training_source(proxy) == _training_source(private)


def _touch_tree(path: Path) -> None:
    import time

    now = time.time()
    for f in [path, *path.rglob("*")]:
        os.utime(f, (now, now))


def _release_trial_lock(trial_dir: Path) -> None:
    """A trial's phase lock is held by this process until it exits; many trials would pile them up."""
    from dist_dpc.pipeline import trainer

    for path in [p for p in trainer._PHASE_LOCKS if p.startswith(str(trial_dir))]:
        trainer._PHASE_LOCKS.pop(path).close()


def _correct(model_dir: Path, cfg: Config, ctx: PhaseContext, data) -> int:
    """Correct holdout predictions, counted as an integer (the score's sensitivity is 1)."""
    model = ctx.task.load_model(ModelConfig(name=str(model_dir), task=cfg.model.task, num_labels=ctx.num_labels,
                                            tokenizer=cfg.model.tokenizer),
                                ctx.tokenizer, num_labels=ctx.num_labels, label_names=ctx.label_names, seed=cfg.run.seed)
    return ctx.task.evaluate(model.to(local_device()), data, ctx.tokenizer.pad_token_id,
                             cfg.train.eval_batch_size)["correct"]



def _track(ctx: PhaseContext, results: dict) -> None:
    """The selection in W&B: what was searched, chosen and what it cost (never the trials' number)."""
    from dist_dpc.pipeline.trainer import open_tracker

    tracker = open_tracker(ctx)
    tracker.summary({"tune/mode": results["mode"], "tune/epsilon_selection": results["epsilon_selection"],
                     "final_epsilon": results["epsilon"],
                     **{f"tune/selected/{k}": v for k, v in results["selected"].items()}})
    if results["mode"] == "public_proxy":
        tracker.table("tune_trials", ["candidate", "proxy_accuracy"],
                      [[json.dumps(r["values"], sort_keys=True), r["proxy_accuracy"]] for r in results["trials"]])
    tracker.finish()
