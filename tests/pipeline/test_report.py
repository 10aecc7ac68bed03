"""`dpc report`: the privacy report of a real `dpc train` run tree and of a hand-built multi-phase ledger.

Every epsilon in the report must be the composition of the ledger's mechanisms (never a sum), agree
with what training printed, and show up in the Markdown; the plots must be real PNG files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_dpc.pipeline.report import LEDGER_FILE, ReportError, write_report
from dist_dpc.privacy.accounting import Mechanism, compute_epsilon
from dist_dpc.privacy.ledger import PrivacyLedger

ROOT = Path(__file__).resolve().parents[2]
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "WANDB_SERVICE")  # see test_train
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env() -> dict:
    # A child must not inherit a torch.distributed rendezvous left by in-process tests.
    base = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return dict(base, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", WANDB_MODE="offline",
                PYTHONPATH=str(ROOT),
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real 6-step `dpc train` run (tiny BERT, 200 generated examples), every step logged."""
    out = tmp_path_factory.mktemp("report_runs")
    args = [sys.executable, "-m", "dist_dpc.cli", "train", "configs/debug.yaml", f"run.output_dir={out}", "run.name=r",
            "model.name=tiny-bert", "data.synthetic_size=200", "data.max_length=16", "train.batch_size=20",
            "train.micro_batch_size=8", "train.max_steps=6", "privacy.target_epsilon=4", "train.log_every=1"]
    proc = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = out / "r"
    if not (run / LEDGER_FILE).is_file():
        # FALLBACK for runs made before `dpc train` wrote privacy_ledger.json: rebuild the ledger from
        # results.json. Delete this block once every training run writes the ledger itself.
        res = json.loads((run / "results.json").read_text())
        PrivacyLedger(run / LEDGER_FILE, 4.0, res["delta"], res["dataset_size"], res["accountant"]).record(
            "train", [Mechanism(res["noise_multiplier"], res["sample_rate"], res["steps"])], "completed")
    return run


def _stored_mechanisms(run: Path) -> tuple[list[Mechanism], float]:
    data = json.loads((run / LEDGER_FILE).read_text())
    mechanisms = [Mechanism.from_dict(m) for entry in data["phases"].values() for m in entry["mechanisms"]]
    return mechanisms, data["delta"]


def _assert_png(path: Path) -> None:
    assert path is not None and path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 5000, f"{path} is only {len(data)} bytes: an empty plot?"


def _assert_curve_ends_at_total(report: dict) -> list[float]:
    cumulative = [e for c in report["curves"] for e in c["cumulative_prv"]]
    steps = [s for c in report["curves"] for s in c["global_steps"]]
    assert cumulative[0] == 0.0 and steps[0] == 0
    assert all(b >= a for a, b in zip(cumulative, cumulative[1:])), f"epsilon decreases along the run: {cumulative}"
    assert all(b >= a for a, b in zip(steps, steps[1:]))
    assert cumulative[-1] == pytest.approx(report["total_epsilon_prv"], rel=1e-9)
    return cumulative


def test_report_of_a_real_train_run(trained_run, tmp_path):
    results = json.loads((trained_run / "results.json").read_text())
    mechanisms, delta = _stored_mechanisms(trained_run)
    report = write_report(trained_run)

    # The headline is the ledger's composition, and what training itself printed.
    assert report["total_epsilon_prv"] == pytest.approx(compute_epsilon(mechanisms, delta, "prv"), rel=1e-9)
    assert report["total_epsilon_rdp"] == pytest.approx(compute_epsilon(mechanisms, delta, "rdp"), rel=1e-9)
    assert report["total_epsilon_prv"] == pytest.approx(results["epsilon"], rel=1e-6)
    assert report["total_epsilon_rdp"] == pytest.approx(results["epsilon_rdp"], rel=1e-6)
    assert report["total_epsilon_prv"] <= 4.0 * (1 + 1e-6)
    assert report["dataset_size"] == 200 and report["delta"] == pytest.approx(results["delta"])

    [row] = report["phases"]
    assert row["phase"] == "train" and row["status"] == "completed" and row["sampling"] == "poisson"
    assert row["steps"] == 6 and row["mechanisms"][0]["expected_batch_size"] == pytest.approx(20.0)
    assert report["shuffle_phases"] == []

    # The per-step epsilons logged during training lie on the recomputed curve.
    _assert_curve_ends_at_total(report)
    [curve] = report["curves"]
    assert len(curve["logged"]) == 6
    at = dict(zip(curve["global_steps"], curve["cumulative_prv"]))
    for step, eps in curve["logged"]:
        assert at[step] == pytest.approx(eps, rel=1e-6), step

    md = report["markdown"].read_text()
    assert report["markdown"] == trained_run / "report" / "privacy_report.md"
    for text in (f"epsilon = {results['epsilon']:.3f}", f"{results['epsilon_rdp']:.3f}",
                 f"{results['noise_multiplier']:.4f}", f"{results['delta']:.3g}", "N = 200", "delta < 1/N",
                 "| train | completed | poisson |", "add/remove", "Poisson sampling", "Post-processing spends nothing",
                 f"{results['metrics']['validation']['accuracy'] * 100:.2f}%", f"{results['parameters']:,}"):
        assert text in md, text
    assert "WARNING" not in md

    _assert_png(report["plots"]["epsilon"])
    _assert_png(report["plots"]["models"])

    # --output puts everything elsewhere.
    elsewhere = write_report(trained_run, tmp_path / "out")
    assert elsewhere["markdown"] == tmp_path / "out" / "privacy_report.md"
    _assert_png(tmp_path / "out" / "epsilon_vs_step.png")


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def multi_phase_run(tmp_path) -> Path:
    """teacher (Poisson, completed) then distill (shuffle, still running), eval and export done."""
    run = tmp_path / "multi"
    n = 1000
    ledger = PrivacyLedger(run / LEDGER_FILE, 8.0, 1 / n ** 1.1, n, "prv")
    ledger.record("teacher", [Mechanism(1.1, 0.05, 60)], "completed")
    ledger.record("distill", [Mechanism(0.8, 0.1, 40)], "running")
    _write(run / "teacher" / "results.json", {"metrics": {"validation": {"accuracy": 0.84, "f1": 0.83}},
                                              "steps": 60, "private": True, "sampling": "poisson",
                                              "parameters": 4_000_000})
    _write(run / "distill" / "results.json", {"metrics": {"validation": {"accuracy": 0.79}}, "steps": 40,
                                              "private": True, "sampling": "shuffle", "parameters": 2_000_000})
    _write(run / "eval" / "results.json", {"models": [
        {"phase": "teacher", "metrics": {"validation": {"accuracy": 0.85}}, "parameters": 4_000_000,
         "nonzero_parameters": 3_990_000, "size_mb": 15.3},
        {"phase": "distill", "accuracy": 0.78, "parameters": 2_000_000, "nonzero_parameters": 1_000_000,
         "size_mb": 7.7}]})
    _write(run / "export" / "results.json", {"source_phase": "distill"})
    return run


def test_multi_phase_ledger_composes_and_flags_shuffle(multi_phase_run):
    teacher, distill = [Mechanism(1.1, 0.05, 60)], [Mechanism(0.8, 0.1, 40)]
    delta = 1 / 1000 ** 1.1
    report = write_report(multi_phase_run)

    total = compute_epsilon(teacher + distill, delta, "prv")
    assert report["total_epsilon_prv"] == pytest.approx(total, rel=1e-9)
    assert report["total_epsilon_rdp"] == pytest.approx(compute_epsilon(teacher + distill, delta, "rdp"), rel=1e-9)
    alone = [compute_epsilon(teacher, delta, "prv"), compute_epsilon(distill, delta, "prv")]
    assert total < sum(alone) - 0.1  # composition, not a sum of the phases' epsilons

    rows = {r["phase"]: r for r in report["phases"]}
    assert list(rows) == ["teacher", "distill"]
    assert rows["teacher"]["epsilon_phase_prv"] == pytest.approx(alone[0], rel=1e-9)
    assert rows["distill"]["epsilon_phase_prv"] == pytest.approx(alone[1], rel=1e-9)
    assert rows["teacher"]["epsilon_cumulative_prv"] == pytest.approx(alone[0], rel=1e-9)
    assert rows["distill"]["epsilon_cumulative_prv"] == pytest.approx(total, rel=1e-9)
    assert rows["distill"]["mechanisms"][0]["expected_batch_size"] == pytest.approx(100.0)
    assert rows["distill"]["status"] == "running"
    assert report["shuffle_phases"] == ["distill"]

    # The tree's curve runs on across the phase boundary: distill starts where teacher ended.
    cumulative = _assert_curve_ends_at_total(report)
    first, second = report["curves"]
    assert second["offset"] == 60 and second["global_steps"][-1] == 100
    assert second["cumulative_prv"][0] == pytest.approx(first["cumulative_prv"][-1], rel=1e-12)
    assert second["phase_prv"][0] == 0.0 and second["phase_prv"][-1] == pytest.approx(alone[1], rel=1e-9)
    assert 15 <= len(cumulative) <= 2 * 21

    md = report["markdown"].read_text()
    assert "WARNING: phase(s) distill used shuffled" in md  # at the top, before the numbers
    assert md.index("WARNING") < md.index("## Guarantee")
    assert "**WARNING: phase distill used shuffled fixed-size batches" in md
    assert "teacher used shuffled" not in md
    for text in (f"epsilon = {total:.3f}", f"{alone[0]:.3f}", f"{alone[1]:.3f}", "| 1.1000 | 0.05 | 60 | 50.0 |",
                 "| 0.8000 | 0.1 | 40 | 100.0 |", "| eval | done | post-processing |", "| export | done |",
                 "not completed (distill)", "85.00%", "78.00%", "1,000,000", "15.30"):
        assert text in md, text
    assert [m["phase"] for m in report["models"]] == ["teacher", "distill"]
    assert [m["accuracy"] for m in report["models"]] == [0.85, 0.78]  # eval's numbers beat the phases' own
    _assert_png(report["plots"]["epsilon"])
    _assert_png(report["plots"]["models"])


def test_large_delta_huge_epsilon_and_missing_pieces(tmp_path):
    run = tmp_path / "bare"
    ledger = PrivacyLedger(run / LEDGER_FILE, None, 0.02, 100, "rdp")
    ledger.record("teacher", [Mechanism(2.0, 0.1, 10)], "completed")
    ledger.record("imported:old", [Mechanism(0.3, 0.5, 200)], "completed")  # epsilon in the hundreds
    report = write_report(run)  # no config.yaml, no phase directories, no results: still a report
    md = report["markdown"].read_text()
    assert "delta >= 1/N" in md and "none (fixed noise multiplier)" in md
    assert "Accountant the run budgeted with: RDP" in md
    assert report["models"] == [] and report["plots"]["models"] is None
    assert [r["sampling"] for r in report["phases"]] == ["unknown", "unknown"]
    # PRV gives up there; the RDP bound stands in and the report says so instead of calling it PRV.
    assert report["total_prv_fell_back_to_rdp"] and report["total_epsilon_prv"] > 100
    assert report["total_epsilon_prv"] == pytest.approx(report["total_epsilon_rdp"], rel=1e-12)
    assert "the RDP bound (the PRV accountant could not be used" in md and " † |" in md
    assert "PRV accountant not used" in md
    assert report["phases"][0]["prv_fell_back"] == {"phase": False, "cumulative": False}
    _assert_png(report["plots"]["epsilon"])


def test_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ReportError, match=f"{missing}.*does not exist"):
        write_report(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match=r"privacy_ledger\.json not found.*`dpc train`"):
        write_report(empty)
    _write(empty / "results.json", {"private": False})
    with pytest.raises(ReportError, match="WITHOUT differential privacy"):
        write_report(empty)
    (empty / LEDGER_FILE).write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        write_report(empty)
    assert not (empty / "report").exists()  # nothing written on failure


def test_runs_that_released_exact_statistics_are_marked(multi_phase_run):
    from dist_dpc.pipeline.report import summary_line

    assert write_report(multi_phase_run)["statistics_released_without_dp"] == []
    results = json.loads((multi_phase_run / "distill" / "results.json").read_text())
    _write(multi_phase_run / "distill" / "results.json", {**results, "statistics_released_without_dp": True})
    report = write_report(multi_phase_run)
    assert report["statistics_released_without_dp"] == ["distill"]
    md = report["markdown"].read_text()
    assert "**WARNING: statistics released without DP** in phase(s) distill" in md
    assert md.index("statistics released without DP") < md.index("## Guarantee")
    assert "statistics released without DP in distill" in summary_line(report)
