"""``dpc report RUN_DIR``: what a run tree spent, as a Markdown privacy report and two PNG plots.

Every epsilon is recomputed from the run tree's privacy ledger (RUN_DIR/privacy_ledger.json): the
total is the PRV composition of all recorded mechanisms (RDP beside it for comparison), never a sum
of per-phase epsilons. The phases' results.json and metrics.jsonl add what the ledger does not hold:
the sampling actually used, accuracies, model sizes and the epsilon logged during training (drawn
over the recomputed curve as a cross-check). A phase that ran with privacy.release_exact_statistics
(results.json: statistics_released_without_dp) is marked at the top. The report only reads the run
tree and writes its own output directory; it spends no privacy.

    RUN/privacy_ledger.json  config.yaml  [results.json metrics.jsonl]     (single-phase `dpc train`)
        teacher/ distill/ prune/: results.json metrics.jsonl             (pipeline phases)
        eval/results.json  export/results.json                          (post-processing)
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from dist_dpc.privacy.accounting import Mechanism, RdpCurve, compute_epsilon, mechanism_from_dict
from dist_dpc.privacy.ledger import PrivacyLedger

LEDGER_FILE = "privacy_ledger.json"
REPORT_FILE = "privacy_report.md"
EPSILON_PLOT = "epsilon_vs_step.png"
MODELS_PLOT = "accuracy_vs_size.png"
# The names of dist_dpc.pipeline.config / trainer, repeated here: importing them pulls in torch,
# and a report must be quick to make on a login node.
MODEL_PHASES = ("train", "teacher", "distill", "prune", "distill_synthetic")
POST_PROCESSING = ("generate", "distill_synthetic", "eval", "export")  # read only DP outputs, spend nothing
POST_RESULTS = {"generate": "summary.json"}  # the file a finished post-processing phase writes (else results.json)
DEFAULT_POINTS = 20


class ReportError(ValueError):
    """The run directory cannot be reported on (missing, no ledger, unreadable ledger)."""


@dataclass
class Phase:
    """One ledger entry, with what its directory says about it."""
    name: str
    status: str
    mechanisms: list[Mechanism]
    directory: Path | None            # None for phases without a directory (imported lineages)
    results: dict | None = None
    logged: list[tuple[int, float]] = field(default_factory=list)  # (step, privacy/epsilon) of metrics.jsonl
    sampling: str = "unknown"
    sampling_source: str = ""

    @property
    def steps(self) -> int:
        return sum(m.steps for m in self.mechanisms)


@dataclass
class RunTree:
    path: Path
    name: str
    config: dict
    ledger: PrivacyLedger
    phases: list[Phase]
    post_processing: dict[str, dict]  # eval/export -> their results.json ({} if it has none)


# -- reading the run tree ----------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise ReportError(f"{path} is not valid JSON ({err}); was it written by another tool?") from err


def _read_metrics(path: Path) -> list[tuple[int, float]]:
    """(step, privacy/epsilon) pairs; a torn last line (a job killed mid-write) is skipped."""
    points = []
    if not path.is_file():
        return points
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        eps = row.get("privacy/epsilon") if isinstance(row, dict) else None
        if isinstance(eps, (int, float)) and math.isfinite(eps) and isinstance(row.get("step"), int):
            points.append((row["step"], float(eps)))
    return sorted(points)


def _read_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}  # optional: the report falls back to the ledger and results.json
    return data if isinstance(data, dict) else {}


def _missing_ledger(run_dir: Path, ledger_path: Path) -> ReportError:
    results = _read_json(run_dir / "results.json") or {}
    if results.get("private") is False:
        return ReportError(f"{run_dir} was trained WITHOUT differential privacy (results.json: private=false): "
                           "there is no privacy guarantee to report")
    return ReportError(
        f"{ledger_path} not found: the report is computed from the run tree's privacy ledger, which `dpc train` "
        f"and the pipeline phases (`dpc teacher`, `dpc pipeline`, ...) write before their first private step. "
        f"Run one of them with run.output_dir={run_dir.parent} run.name={run_dir.name} first, or give the "
        "directory that holds privacy_ledger.json")


def open_ledger(run_dir: Path) -> PrivacyLedger:
    """The ledger as stored: PrivacyLedger checks it against its own delta and N."""
    path = run_dir / LEDGER_FILE
    data = _read_json(path)
    if data is None:
        raise _missing_ledger(run_dir, path)
    try:
        return PrivacyLedger(path, data.get("target_epsilon"), data["delta"], data["dataset_size"],
                             data.get("accountant", "prv"))
    except (KeyError, TypeError, ValueError) as err:
        raise ReportError(f"{path} is not a readable privacy ledger ({type(err).__name__}: {err})") from err


def _phase_directory(run_dir: Path, name: str, entry: dict, latest: dict[str, str]) -> Path | None:
    """The directory whose results.json and metrics.jsonl describe ledger entry ``name``: its phase's
    directory for the phase's latest attempt; none for an earlier attempt (its files were
    overwritten by the later one) or an imported/declared entry (no directory in this tree)."""
    phase = entry.get("phase", name)
    if ":" in phase or "/" in phase or latest.get(phase) != name:
        return None
    return run_dir if phase == "train" else run_dir / phase  # `dpc train` writes into the run root


def _sampling(phase: Phase, config: dict) -> tuple[str, str]:
    """(sampling, where it was read): the phase's own results.json beats the saved config."""
    if phase.results and phase.results.get("sampling"):
        return str(phase.results["sampling"]), "results.json"
    configured = (config.get("privacy") or {}).get("sampling")
    if phase.directory is not None and configured:
        return str(configured), "config.yaml"
    return "unknown", "imported from another run tree" if phase.directory is None else "not recorded"


def load_run(run_dir: str | Path) -> RunTree:
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"run directory {path} does not exist (or is not a directory): give the directory "
                          "run.output_dir/run.name of a `dpc train` or `dpc pipeline` run")
    ledger = open_ledger(path)
    config = _read_config(path)
    phases = []
    entries = ledger.phases()
    latest = {e.get("phase", n): n for n, e in entries.items()}  # later attempts come later in the ledger
    for name, entry in entries.items():
        directory = _phase_directory(path, name, entry, latest)
        phase = Phase(name=name, status=entry["status"],
                      mechanisms=[mechanism_from_dict({**m, "phase": name}) for m in entry["mechanisms"]],
                      directory=directory)
        if directory is not None:
            phase.results = _read_json(directory / "results.json")
            phase.logged = _read_metrics(directory / "metrics.jsonl")
        phase.sampling, phase.sampling_source = _sampling(phase, config)
        phases.append(phase)
    post = {name: _read_json(path / name / POST_RESULTS.get(name, "results.json")) or {} for name in POST_PROCESSING
            if (path / name).is_dir()}
    name = (config.get("run") or {}).get("name") or path.name
    return RunTree(path=path, name=str(name), config=config, ledger=ledger, phases=phases, post_processing=post)


# -- accounting -------------------------------------------------------------------------------------
class _Notes:
    """compute_epsilon, collecting its warnings (an RDP bound standing in for PRV) once each for the
    report, and counting how many values were such stand-ins."""

    def __init__(self):
        self.messages: list[str] = []
        self.fallbacks = 0

    def epsilon(self, mechanisms: list[Mechanism], delta: float, accountant: str) -> float:
        return self.marked(mechanisms, delta, accountant)[0]

    def marked(self, mechanisms: list[Mechanism], delta: float, accountant: str) -> tuple[float, bool]:
        """(epsilon, True if the accountant reported the RDP bound instead of PRV)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eps = compute_epsilon(mechanisms, delta, accountant)
        for w in caught:
            if str(w.message) not in self.messages:
                self.messages.append(str(w.message))
        self.fallbacks += bool(caught)
        return eps, bool(caught)


def truncate(mechanisms: list[Mechanism], steps: int) -> list[Mechanism]:
    """The first ``steps`` steps of a phase (its mechanisms run in order)."""
    out, left = [], steps
    for m in mechanisms:
        if left <= 0:
            break
        out.append(m if isinstance(m, RdpCurve) else
                   Mechanism(m.noise_multiplier, m.sample_rate, min(m.steps, left), m.phase))
        left -= m.steps
    return out


def phase_rows(tree: RunTree, notes: _Notes) -> list[dict]:
    delta, n = tree.ledger.delta, tree.ledger.dataset_size
    rows, before = [], []
    for phase in tree.phases:
        upto = before + phase.mechanisms
        reported = (phase.results or {}).get("epsilon")
        alone, alone_rdp = notes.marked(phase.mechanisms, delta, "prv")
        cumulative, cumulative_rdp = notes.marked(upto, delta, "prv")
        rows.append({
            "phase": phase.name, "status": phase.status, "sampling": phase.sampling,
            "sampling_source": phase.sampling_source, "steps": phase.steps,
            "mechanisms": [{"noise_multiplier": None, "sample_rate": None, "steps": 1, "expected_batch_size": None,
                            "rdp_curve": m.label} if isinstance(m, RdpCurve) else
                           {"noise_multiplier": m.noise_multiplier, "sample_rate": m.sample_rate, "steps": m.steps,
                            "expected_batch_size": m.sample_rate * n} for m in phase.mechanisms],
            "epsilon_phase_prv": alone, "epsilon_cumulative_prv": cumulative,
            "prv_fell_back": {"phase": alone_rdp, "cumulative": cumulative_rdp},  # RDP bound stood in for PRV
            "epsilon_cumulative_rdp": notes.epsilon(upto, delta, "rdp"),
            "epsilon_results_json": float(reported) if isinstance(reported, (int, float)) else None,
            "accountant_results_json": (phase.results or {}).get("accountant"),
        })
        before = upto
    return rows


def _grid(steps: int, points: int) -> list[int]:
    """~``points`` steps in [0, steps], denser at the start (quadratic spacing), where epsilon rises
    fastest (~sqrt(k)); every step when there are fewer steps than points."""
    return sorted({round(steps * (i / points) ** 2) for i in range(points + 1)})


def epsilon_curves(tree: RunTree, notes: _Notes, points: int = DEFAULT_POINTS) -> list[dict]:
    """Per phase, at ~``points`` steps k: epsilon of the phase's first k steps alone, and of the whole
    tree up to there (all earlier phases + k steps of this one), by PRV and RDP; global step axis."""
    delta = tree.ledger.delta
    curves, before, offset = [], [], 0
    for phase in tree.phases:
        ks = _grid(phase.steps, points)
        part = [truncate(phase.mechanisms, k) for k in ks]
        curves.append({
            "phase": phase.name, "offset": offset, "steps": ks,
            "global_steps": [offset + k for k in ks],
            "phase_prv": [notes.epsilon(p, delta, "prv") for p in part],
            "cumulative_prv": [notes.epsilon(before + p, delta, "prv") for p in part],
            "cumulative_rdp": [notes.epsilon(before + p, delta, "rdp") for p in part],
            "logged": [(offset + s, e) for s, e in phase.logged],
        })
        before = before + phase.mechanisms
        offset += phase.steps
    return curves


def model_rows(tree: RunTree) -> list[dict]:
    """One row per model with results: eval/results.json when it measured it, else the phase's own."""
    evaluated = {row.get("phase"): row for row in tree.post_processing.get("eval", {}).get("models", [])
                 if isinstance(row, dict)}
    own = {phase.name: phase.results for phase in tree.phases}
    rows = []
    names = [p.name for p in tree.phases if p.name in MODEL_PHASES]
    names += [name for name in evaluated if name not in names]
    for name in names:
        source = evaluated.get(name) or own.get(name)
        if not source:
            continue
        split, accuracy, f1 = _accuracy(source)
        if accuracy is None:
            continue
        trained = own.get(name) or {}
        rows.append({"phase": name, "split": split, "accuracy": accuracy, "f1": f1,
                     "parameters": source.get("parameters", trained.get("parameters")),
                     "nonzero_parameters": source.get("nonzero_parameters", trained.get("nonzero_parameters")),
                     "size_mb": source.get("size_mb", trained.get("size_mb")),
                     "source": "eval/results.json" if name in evaluated else "results.json"})
    return rows


def _accuracy(results: dict) -> tuple[str | None, float | None, float | None]:
    """(split, accuracy, f1): flat rows (eval) or {"metrics": {split: ...}}; validation first."""
    if isinstance(results.get("accuracy"), (int, float)):
        return results.get("split"), float(results["accuracy"]), results.get("f1")
    metrics = results.get("metrics") or {}
    if not metrics:
        return None, None, None
    split = "validation" if "validation" in metrics else next(iter(metrics))
    m = metrics[split] or {}
    return split, m.get("accuracy"), m.get("f1")


# -- plots --------------------------------------------------------------------------------------------
def _figure(width: float = 8.0, height: float = 5.0):
    # The object API with the Agg canvas: no pyplot global state, no backend switch in the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_epsilon(tree: RunTree, curves: list[dict], totals: dict, path: Path) -> Path:
    total_prv = totals["prv"]
    fig = _figure(8.0, 5.6)
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(curves))]
    xs = [x for c in curves for x in c["global_steps"]]
    ax.plot(xs, [e for c in curves for e in c["cumulative_prv"]], color="black", linewidth=2.2,
            label="whole run tree (PRV)", zorder=3)
    ax.plot(xs, [e for c in curves for e in c["cumulative_rdp"]], color="0.45", linewidth=1.2, linestyle="--",
            label="whole run tree (RDP bound)", zorder=2)
    for curve, color in zip(curves, colors):
        if curve["offset"] > 0:  # the first phase alone is the whole-tree curve: drawing it would hide it
            ax.plot(curve["global_steps"], curve["phase_prv"], color=color, linewidth=1.4,
                    label=f"{curve['phase']} alone (PRV)")
        if curve["logged"]:
            # Training logs the tree's cumulative epsilon: these points should sit on the black curve.
            ax.plot(*zip(*curve["logged"]), linestyle="none", marker="o", markersize=6, markerfacecolor="none",
                    markeredgewidth=1.3, color=color, zorder=4,
                    label=f"{curve['phase']}: privacy/epsilon logged in training")
        if curve["offset"] > 0:
            ax.axvline(curve["offset"], color="0.75", linewidth=0.8, linestyle=":")
    target = tree.ledger.target_epsilon
    if target is not None:
        ax.axhline(target, color="tab:red", linewidth=1.0, linestyle="-.", label=f"target epsilon = {target:g}")
    ax.set_ylabel(f"epsilon at delta = {tree.ledger.delta:.3g}")
    top = max([total_prv, target or 0.0] + [e for c in curves for e in c["cumulative_rdp"]])
    _epsilon_scale(ax, curves, top)
    right = max(xs) if xs and max(xs) > 0 else 1
    ax.set_xlim(0, right * 1.02)  # room for the marker of the last logged step
    _label_phases(ax, curves)
    if not any(c["global_steps"][-1] > c["offset"] for c in curves):
        ax.text(0.5, 0.5, "no private training step recorded in the ledger yet", transform=ax.transAxes,
                ha="center", va="center", color="0.4")
    ax.set_xlabel("training step (phases in ledger order)")
    method = "RDP bound: PRV unusable here" if totals["prv_fell_back"] else "PRV"
    ax.set_title(f"{tree.name}: privacy spent, total epsilon = {total_prv:.3f} ({method})")
    ax.grid(True, alpha=0.3)
    # Below the axes: inside, the legend would cover the first phase's curve or the phase names.
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.savefig(path)
    return path


def _epsilon_scale(ax, curves: list[dict], top: float) -> None:
    """Linear from 0, or logarithmic when one phase spends so much more than another that the
    cheaper phase would be a flat line at the bottom of a linear axis."""
    ends = [c["cumulative_prv"][-1] for c in curves if c["cumulative_prv"] and 0 < c["cumulative_prv"][-1] < math.inf]
    if len(ends) < 2 or max(ends) / min(ends) < 30:
        ax.set_ylim(0, top * 1.12 if 0 < top < math.inf else 1)
        return
    positive = [e for c in curves for key in ("cumulative_prv", "phase_prv") for e in c[key] if 0 < e < math.inf]
    ax.set_yscale("log", nonpositive="mask")
    ax.set_ylim(min(positive) * 0.8, top * 1.6)
    ax.set_ylabel(ax.get_ylabel() + " (log scale)")


def _label_phases(ax, curves: list[dict]) -> None:
    """Phase names at the top of their segment of the step axis (only with several phases)."""
    if len(curves) < 2:
        return
    transform = ax.get_xaxis_transform()  # x in data units, y in axes units
    for curve in curves:
        middle = curve["offset"] + (curve["global_steps"][-1] - curve["offset"]) / 2
        ax.text(middle, 0.985, curve["phase"], transform=transform, ha="center", va="top", fontsize=8, color="0.3")


def plot_models(tree: RunTree, models: list[dict], rows: list[dict], path: Path) -> Path | None:
    """Accuracy vs non-zero parameters (all parameters where non-zeros were not counted)."""
    points = [(m, m["nonzero_parameters"] or m["parameters"]) for m in models
              if (m["nonzero_parameters"] or m["parameters"])]
    if not points:
        return None
    epsilon = {r["phase"]: r["epsilon_cumulative_prv"] for r in rows}
    fig = _figure(7.0, 4.8)
    ax = fig.add_subplot()
    for i, (m, size) in enumerate(points):
        ax.scatter([size], [m["accuracy"] * 100], s=60, color=f"C{i % 10}", zorder=3)
        eps = epsilon.get(m["phase"])
        text = m["phase"] + (f"\neps={eps:.2f}" if eps is not None else "")
        ax.annotate(text, (size, m["accuracy"] * 100), textcoords="offset points", xytext=(7, 4), fontsize=8)
    sizes = [s for _, s in points]
    if max(sizes) / min(sizes) > 20:
        ax.set_xscale("log")
    else:
        ax.set_xlim(0, max(sizes) * 1.25)
    accs = [m["accuracy"] * 100 for m, _ in points]
    ax.set_ylim(max(0.0, min(accs) - 10), min(100.0, max(accs) + 10))
    ax.xaxis.set_major_formatter(_millions())
    ax.set_xlabel("model size: non-zero parameters (dense models: all parameters)")
    split = next((m["split"] for m, _ in points if m["split"]), None)
    ax.set_ylabel("accuracy (%)" + (f", {split}" if split else ""))
    ax.set_title(f"{tree.name}: accuracy vs model size (epsilon of the tree after each phase)")
    ax.grid(True, alpha=0.3)
    fig.savefig(path)
    return path


def _millions():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e5 else f"{x:,.0f}")


# -- Markdown ------------------------------------------------------------------------------------------
def _num(x, fmt: str = ".3f") -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return format(x, fmt)


def _count(x) -> str:
    return "—" if x is None else f"{int(x):,}"


def audit_section(run_dir: Path) -> list[str]:
    """`dpc audit`'s result, in the audit tree's report (docs/audit.md)."""
    a = _read_json(run_dir / "audit" / "audit.json")
    if not a:
        return []
    claimed = "not private" if a.get("claimed_epsilon") is None else f"{a['claimed_epsilon']:.3f}"
    verdict = ("**FAILED: the canaries reject the accounted mechanism**" if a.get("claimed_epsilon") is not None
               and (a["epsilon_lb"] > a["claimed_epsilon"] or a.get("claim_rejected")) else "consistent with the claim")
    what = "white-box gradient canaries" if a.get("kind") == "white_box" else "black-box input canaries"
    test = ("f-DP test (Mahloujifar et al.): epsilon_lb is the epsilon of DP-SGD with the run's q and steps that the "
            "run is shown to leak more than" if a.get("test") == "f_dp" else
            "(epsilon, delta) test (Steinke et al.): the run is not (epsilon, delta)-DP for any epsilon below epsilon_lb")
    lines = [f"## Empirical audit (one run, {what})", "",
             f"- Empirical **epsilon_lb = {a['epsilon_lb']:.3f}** at {a['confidence']:.0%} confidence "
             f"(delta {a['delta']:.3g}); claimed epsilon {claimed}: {verdict}.",
             f"- The test: {test}.",
             f"- {a['canaries']} canaries, {a['included']} included; settings audited: sigma {a['noise_multiplier']:.4f}, "
             f"q {a['sample_rate']:.5f}, clipping {a['clipping']}, ZeRO stage {a['zero_stage']}, world size "
             f"{a['world_size']}, optimizer {a['optimizer']}, bf16 {a['bf16']}.", "",
             f"- The most this audit can show (every guess right): {a['ceiling']:.3f}.", "",
             "| statistic | guessed fraction | guesses | correct | epsilon_lb of this test |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {t['score']} | {t['fraction']} | {t['guesses']} | {t['correct']} | {t['epsilon_lb']:.3f} |"
              for t in a["tests"]]
    return lines + ["", f"Each test at {a['per_test_confidence']:.4f} (Bonferroni over the statistics and the fixed "
                        "fractions); the bound is the largest. This tree is an audit: never release it.", ""]


def render_markdown(tree: RunTree, rows: list[dict], models: list[dict], totals: dict, notes: list[str],
                    plots: dict[str, Path | None]) -> str:
    ledger = tree.ledger
    n, delta, target = ledger.dataset_size, ledger.delta, ledger.target_epsilon
    shuffled = [r["phase"] for r in rows if r["sampling"] == "shuffle"]
    lines = [f"# Privacy report: {tree.name}", ""]
    released = released_without_dp(tree)
    if released:
        lines += [f"> **WARNING: statistics released without DP** in phase(s) {', '.join(released)} "
                  "(privacy.release_exact_statistics=true): their logs, W&B runs, metrics.jsonl and results.json hold "
                  "exact training-set statistics (train loss, clipped fractions, gradient-norm quantiles, batch "
                  "sizes). The guarantee below does not cover them.", ""]
    seeded = [p.name for p in tree.phases if (p.results or {}).get("randomness") == "insecure_reproducible"]
    if seeded:
        lines += [f"> **WARNING: noise drawn from a seed** in phase(s) {', '.join(seeded)} "
                  "(privacy.randomness=insecure_reproducible): whoever knows or guesses the seed (privacy.noise_seed "
                  "or noise_seed.json) can subtract the noise. The guarantee below holds only while it stays secret.", ""]
    if shuffled:
        lines += [f"> **WARNING: phase(s) {', '.join(shuffled)} used shuffled fixed-size batches "
                  "(privacy.sampling=shuffle).** The epsilon below assumes Poisson sampling and is NOT a proven "
                  "bound for this run tree.", ""]
    within = "" if target is None else (" (within the target)" if totals["prv"] <= target * (1 + 1e-6)
                                        else " (**EXCEEDS the target**)")
    lines += [
        f"- Run directory: `{tree.path}`",
        f"- Training set size N = {n:,}",
        f"- delta = {delta:.3g}; 1/N = {1 / n:.3g}: "
        + ("delta < 1/N" if delta < 1 / n else "**delta >= 1/N: this permits leaking a whole record**"),
        f"- Target epsilon: {_num(target, 'g') if target is not None else 'none (fixed noise multiplier)'}",
        f"- Accountant the run budgeted with: {ledger.accountant.upper()}",
        "",
        "## Guarantee",
        "",
        f"**(epsilon = {totals['prv']:.3f}, delta = {delta:.3g})-differential privacy** for everything released "
        f"from this run tree{within}: the "
        + ("RDP composition (the ledger holds an RDP curve: `dpc tune`'s private selection)"
           if any(isinstance(m, RdpCurve) for m in ledger.mechanisms()) else
           "RDP bound (the PRV accountant could not be used, see the accountant notes) for the composition"
           if totals["prv_fell_back"] else "PRV composition (opacus)")
        + f" of all {totals['mechanisms']} mechanism(s) of the "
        f"ledger over {totals['steps']:,} steps. RDP bound for comparison: epsilon = {totals['rdp']:.3f}.",
        "",
        "Phases compose heterogeneously in the accountant; per-phase epsilons below are not added up.",
        "",
        "## Phases",
        "",
        "| phase | status | sampling | sigma | q | steps | expected batch q·N | epsilon phase alone (PRV) "
        "| cumulative epsilon (PRV) | cumulative epsilon (RDP) | epsilon in results.json |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sampling = r["sampling"] if r["sampling"] != "shuffle" else "**shuffle (not Poisson!)**"
        mechs = r["mechanisms"] or [{"noise_multiplier": None, "sample_rate": None, "steps": 0,
                                     "expected_batch_size": None}]
        for i, m in enumerate(mechs):
            first = i == 0
            lines.append(
                f"| {r['phase'] if first else ''} | {r['status'] if first else ''} | {sampling if first else ''} "
                + (f"| {m['rdp_curve']} (RDP curve) | | 1 " if m.get("rdp_curve") else
                   f"| {_num(m['noise_multiplier'], '.4f')} | {_num(m['sample_rate'], '.5g')} | {m['steps']:,} ")
                + f"| {_num(m['expected_batch_size'], '.1f')} "
                + (f"| {_num(r['epsilon_phase_prv'])}{_dagger(r, 'phase')} "
                   f"| {_num(r['epsilon_cumulative_prv'])}{_dagger(r, 'cumulative')} "
                   f"| {_num(r['epsilon_cumulative_rdp'])} | {_reported(r)} |" if first else "| | | | |"))
    for name, results in tree.post_processing.items():
        lines.append(f"| {name} | {'done' if results else 'incomplete'} | post-processing | — | — | 0 | — | 0 "
                     f"| (unchanged) | (unchanged) | {_num(results.get('epsilon'))} |")
    if any(any(r["prv_fell_back"].values()) for r in rows):
        lines += ["", "† RDP upper bound: the PRV accountant could not be used for this value (accountant notes)."]
    lines += ["", *_assumptions(tree, rows), ""]
    lines += tuning_section(tree.path)
    lines += audit_section(tree.path)
    if models:
        lines += ["## Models", "",
                  "| model | split | accuracy | F1 | parameters | non-zeros | size (MB) | cumulative epsilon (PRV) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        epsilon = {r["phase"]: r["epsilon_cumulative_prv"] for r in rows}
        for m in models:
            lines.append(f"| {m['phase']} | {m['split'] or '—'} | {m['accuracy'] * 100:.2f}% "
                         f"| {_num(None if m['f1'] is None else m['f1'] * 100, '.2f')} | {_count(m['parameters'])} "
                         f"| {_count(m['nonzero_parameters'])} | {_num(m['size_mb'], '.2f')} "
                         f"| {_num(epsilon.get(m['phase']))} |")
        lines.append("")
    lines += ["## Plots", ""]
    for title, key in (("Epsilon vs step", "epsilon"), ("Accuracy vs model size", "models")):
        if plots.get(key) is not None:
            lines += [f"![{title}]({plots[key].name})", ""]
    if notes:
        lines += ["## Accountant notes", "", *[f"- {note}" for note in notes], ""]
    return "\n".join(lines)


def tuning_section(run_dir: Path) -> list[str]:
    """What `dpc tune` tuned in this tree, what it chose and what the choice cost."""
    t = _read_json(run_dir / "tune" / "results.json")
    if not t:
        return []
    search = "; ".join(f"{k} in {v}" for k, v in t["search"].items())
    chosen = ", ".join(f"{k}={v}" for k, v in t["selected"].items())
    lines = ["## Hyper-parameter selection (`dpc tune`)", "", f"- searched: {search} ({t['candidates']} candidates)",
             f"- selected: {chosen}"]
    if t["mode"] == "private":
        lines += [f"- private selection (Papernot & Steinke 2022): a secret number of trials K with E[K] = "
                  f"{t['expected_trials']:g} (eta {t['eta']:g}); each trial trained with DP-SGD on the training set "
                  f"minus a private holdout of {t['holdout_examples']} examples and was scored by its holdout accuracy "
                  f"with Gaussian noise (sigma {t['score_noise_multiplier']:g} counts); only the best trial is released",
                  f"- the selected trial's noisy holdout accuracy: {t['holdout_accuracy_noisy'] * 100:.2f} %",
                  f"- cost: epsilon {t['epsilon_selection']:.3f} for the selection alone (ledger entry "
                  f"`{t['ledger_entry']}`, an RDP curve; the tree's total composes it by RDP)", ""]
    else:
        lines += [f"- on the public proxy data set {t['proxy_data']} (no private example used; cost: none, declared in "
                  "the ledger)", "", "| candidate | proxy accuracy |", "|---|---:|"]
        lines += [f"| {r['values']} | {r['proxy_accuracy'] * 100:.2f}% |" for r in t["trials"]]
        lines.append("")
    return lines


def released_without_dp(tree: RunTree) -> list[str]:
    """Phases whose results.json says they ran with privacy.release_exact_statistics."""
    return [p.name for p in tree.phases if (p.results or {}).get("statistics_released_without_dp")]


def _dagger(row: dict, column: str) -> str:
    return " †" if row["prv_fell_back"][column] else ""


def _reported(row: dict) -> str:
    """The epsilon the phase printed when it finished, flagged if the ledger now says otherwise
    (a phase re-run after it, or an edited ledger)."""
    eps = row["epsilon_results_json"]
    if eps is None:
        return "—"
    which = row["accountant_results_json"] or "prv"
    expected = row["epsilon_cumulative_prv"] if which == "prv" else row["epsilon_cumulative_rdp"]
    flag = "" if math.isclose(eps, expected, rel_tol=1e-3, abs_tol=1e-6) else " (differs from the ledger!)"
    return f"{eps:.3f} ({which.upper()}){flag}"


def _assumptions(tree: RunTree, rows: list[dict]) -> list[str]:
    privacy = tree.config.get("privacy") or {}
    clip = privacy.get("max_grad_norm")
    clipping = f"per-sample gradient clipping to norm C = {clip:g}" if isinstance(clip, (int, float)) \
        else "per-sample gradient clipping"
    if privacy.get("clipping"):
        clipping += f" ({privacy['clipping']})"
    lines = ["## Accounting assumptions", "",
             "- Neighbouring data sets: **add/remove one training example** (N is public).",
             f"- Each step: {clipping}, Gaussian noise of standard deviation sigma·C on the clipped sum.",
             "- **Poisson sampling**: each example joins each logical batch independently with probability q."]
    for r in rows:
        if r["sampling"] == "shuffle":
            lines.append(f"  - **WARNING: phase {r['phase']} used shuffled fixed-size batches (sampling=shuffle, "
                         f"from {r['sampling_source']}). Its epsilon assumes Poisson sampling and is NOT a proven "
                         "bound.**")
        elif r["phase"].split("#")[0] == "histogram":
            lines.append(f"  - phase {r['phase']}: no sampling: the Gaussian mechanism on every control-code count of "
                         "the public schema at once (q = 1, one release; one record changes one count by 1).")
        elif r["sampling"] != "poisson":
            lines.append(f"  - phase {r['phase']}: sampling {r['sampling_source'] or 'unknown'}; assumed Poisson.")
    head = tree.config.get("head_init") or {}
    if head.get("centre_pooler") is not False:  # true, or null (on for BERT-style heads)
        lines.append(f"- Rows with q = 1 are head_init's DP mean of the [CLS] states where it ran (a histogram "
                     f"phase's row is its histogram; the mean's sigma is scaled to the public N unless set): each clipped to norm "
                     f"R = {head.get('mean_clip_norm')}, Gaussian noise of standard deviation sigma·R on their sum "
                     "(one release per phase, per round for prune).")
    if head.get("probe_epochs"):
        lines.append("- Each phase's DP-SGD steps include its DP linear probe of the classifier (same sigma and q, "
                     "flat clipping to C).")
    running = [r["phase"] for r in rows if r["status"] != "completed"]
    if running:
        lines.append(f"- Phase(s) not completed ({', '.join(running)}): counted with all their planned steps "
                     "(the ledger records the plan before the first private step).")
    lines.append("- Post-processing spends nothing: generate, distill_synthetic, eval and export read only DP models "
                 "and text generated from them, never the private training data (eval scores the test split)"
                 + (f" (present: {', '.join(tree.post_processing)})." if tree.post_processing else "."))
    lines.append("- The noise key is never written in privacy.randomness=secure mode; with insecure_reproducible "
                 "the seed (noise_seed.json, privacy.noise_seed) is as sensitive as the data: the guarantee holds "
                 "only while it stays secret.")
    return lines


# -- entry point ---------------------------------------------------------------------------------------
def write_report(run_dir: str | Path, output: str | Path | None = None, points: int = DEFAULT_POINTS) -> dict:
    """Writes OUTPUT/privacy_report.md, epsilon_vs_step.png and (with model results)
    accuracy_vs_size.png; OUTPUT defaults to RUN_DIR/report. Returns the numbers and paths."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f"points={points!r} must be an integer >= 1 (epsilon evaluations per phase curve)")
    tree = load_run(run_dir)
    out = Path(output) if output is not None else tree.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    notes = _Notes()
    everything = tree.ledger.mechanisms()
    total_prv, fell_back = notes.marked(everything, tree.ledger.delta, "prv")
    totals = {"prv": total_prv, "prv_fell_back": fell_back, "rdp": notes.epsilon(everything, tree.ledger.delta, "rdp"),
              "mechanisms": len(everything), "steps": sum(m.steps for m in everything)}
    rows = phase_rows(tree, notes)
    table_notes = list(notes.messages)  # the curves' own notes are summarised, not listed one by one
    before = notes.fallbacks
    curves = epsilon_curves(tree, notes, points)
    if notes.fallbacks > before:
        table_notes.append(f"{notes.fallbacks - before} point(s) of the PRV epsilon curves are RDP bounds: PRV "
                           "could not be used there (for the reasons above).")
    models = model_rows(tree)
    plots = {"epsilon": plot_epsilon(tree, curves, totals, out / EPSILON_PLOT),
             "models": plot_models(tree, models, rows, out / MODELS_PLOT) if models else None}
    markdown = out / REPORT_FILE
    markdown.write_text(render_markdown(tree, rows, models, totals, table_notes, plots))
    return {"run_dir": str(tree.path), "name": tree.name, "markdown": markdown,
            "plots": plots, "total_epsilon_prv": totals["prv"], "total_epsilon_rdp": totals["rdp"],
            "total_prv_fell_back_to_rdp": totals["prv_fell_back"],
            "delta": tree.ledger.delta, "dataset_size": tree.ledger.dataset_size,
            "target_epsilon": tree.ledger.target_epsilon, "phases": rows, "models": models, "curves": curves,
            "shuffle_phases": [r["phase"] for r in rows if r["sampling"] == "shuffle"], "notes": table_notes,
            "statistics_released_without_dp": released_without_dp(tree)}


def summary_line(report: dict) -> str:
    """What `dpc report` prints."""
    method = "RDP bound, PRV unusable" if report["total_prv_fell_back_to_rdp"] else "PRV"
    return (f"{report['name']}: epsilon={report['total_epsilon_prv']:.3f} ({method}; "
            f"RDP {report['total_epsilon_rdp']:.3f}), "
            f"delta={report['delta']:.3g}, N={report['dataset_size']}"
            + (f"; WARNING: shuffle sampling in {', '.join(report['shuffle_phases'])}"
               if report["shuffle_phases"] else "")
            + (f"; WARNING: statistics released without DP in {', '.join(report['statistics_released_without_dp'])}"
               if report["statistics_released_without_dp"] else "")
            + f"\nreport: {report['markdown']}")
