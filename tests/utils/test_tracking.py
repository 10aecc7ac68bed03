"""A real short training phase writes an offline W&B run with the metrics and the ledger table."""

from __future__ import annotations

import json

import pytest

from tests.pipeline.test_train import BASE, ROOT, dpc
from tests.wandb_files import read_run


@pytest.mark.timeout(600)
def test_offline_wandb_run_holds_metrics_and_ledger(tmp_path):
    proc = dpc(["train", str(ROOT / "configs" / "debug.yaml"), f"run.output_dir={tmp_path}", "run.name=tracked", *BASE,
                "train.max_steps=4", "train.log_every=2", "wandb.mode=offline"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb sync" in proc.stdout
    run_dir = tmp_path / "tracked"
    results = json.loads((run_dir / "results.json").read_text())
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    run = read_run(offline)
    assert run["run"]["group"] == "tracked" and run["run"]["job_type"] == "train"
    assert run["run"]["id"] == (run_dir / "wandb_run_id").read_text().strip()
    assert run["config"]["privacy"]["target_epsilon"] == 4.0
    steps = [h for h in run["history"] if "privacy/epsilon" in h]
    assert [h["_step"] for h in steps] == [2, 4]
    # Under DP only public quantities; the exact statistics of the private batches (train loss,
    # clipped fraction, gradient-norm quantiles, realised batch size, token counts) are not logged.
    for key in ("train/lr", "privacy/epsilon", "privacy/epsilon_rdp", "privacy/noise_multiplier", "privacy/sample_rate",
                "train/expected_batch_size", "perf/samples_per_s", "perf/peak_memory_mb"):
        assert key in steps[-1], key
    for key in ("train/loss", "privacy/clipped_fraction", "privacy/grad_norm_p50", "train/batch_size",
                "perf/tokens_per_s_rank0"):
        assert not any(key in h for h in run["history"]), key
    assert run["summary"]["statistics_released_without_dp"] is False
    assert steps[0]["privacy/epsilon"] < steps[1]["privacy/epsilon"] == pytest.approx(results["epsilon"])
    assert run["summary"]["final_epsilon"] == pytest.approx(results["epsilon"])
    assert run["summary"]["delta"] == pytest.approx(results["delta"])
    assert any("eval/validation/accuracy" in h for h in run["history"])
    table_path = run["summary"]["privacy_ledger.path"]
    table = json.loads((offline / "files" / table_path).read_text())
    assert table["columns"] == ["phase", "status", "noise_multiplier", "sample_rate", "steps"]
    assert table["data"] == [["train", "completed", results["noise_multiplier"], results["sample_rate"], 4]]
    ledger = json.loads((run_dir / "privacy_ledger.json").read_text())
    assert ledger["phases"]["train"]["mechanisms"][0]["noise_multiplier"] == results["noise_multiplier"]
