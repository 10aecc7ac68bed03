"""What a run releases: under DP only public quantities and evaluation-split metrics reach
metrics.jsonl, results.json, stdout/stderr, the W&B run file and the model card; the debug switch
privacy.release_exact_statistics restores the exact statistics and marks the run everywhere."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dist_dpc.data.synthetic import generate
from tests.pipeline.test_phases import CONFIG, ok
from tests.pipeline.test_train import dpc
from tests.wandb_files import read_run

RUN = ["model.name=tiny-bert", "model.dropout=0", "data.synthetic_size=240", "data.max_length=16",
       "train.batch_size=24", "train.micro_batch_size=12", "train.lr=5e-3", "train.max_steps=6", "train.log_every=1",
       "privacy.target_epsilon=6"]
# teacher (with head_init's DP mean and probe, which report clipped fractions) then export (the model card).
TINY = [*RUN, "head_init.centre_pooler=true", "head_init.probe_epochs=1", "wandb.mode=offline",
        "pipeline.phases=[teacher,export]"]
# Names of the exact training-set statistics (step metrics, results.json fields, head_init info).
EXACT_KEYS = ("train/loss", "train/batch_size", "privacy/clipped_fraction", "privacy/grad_norm_", "perf/tokens_per_s",
              "perf/realised_samples_per_s", "clipped_fraction", "norm_methods")
# How the progress lines print them.
EXACT_PROGRESS = (" loss=", " batch=", " clipped=")


def released(run: Path, proc) -> dict[str, str]:
    """Every released artefact of a run tree, as text: metrics, results, logs, W&B run files (the
    run record and its files: tables, summary, config), model card and privacy report."""
    wandb_files = [f for f in run.rglob("*") if "wandb" in f.parts and f.is_file()
                   and f.suffix in (".wandb", ".json", ".yaml")]
    files = [*run.rglob("metrics.jsonl"), *run.rglob("results.json"), *wandb_files,
             *run.glob("export/model/README.md"), *run.glob("export/model/config.json"),
             *run.glob("report/privacy_report.md")]
    out = {str(f.relative_to(run)): f.read_bytes().decode("latin-1") for f in files}
    out["stdout"], out["stderr"] = proc.stdout, proc.stderr
    return out


def progress_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("step ")]


@pytest.mark.timeout(600)
def test_dp_run_releases_no_exact_training_statistics_and_eval_every_logs_progress(tmp_path):
    proc = ok(dpc(["pipeline", CONFIG, f"run.output_dir={tmp_path}", "run.name=dp", *TINY, "train.eval_every=2"],
                  timeout=600))
    run = tmp_path / "dp"
    report = ok(dpc(["report", str(run)]))
    texts = released(run, proc)
    texts["report stdout"] = report.stdout
    assert {"teacher/metrics.jsonl", "teacher/results.json", "export/model/README.md",
            "report/privacy_report.md"} <= set(texts)
    assert any(name.endswith(".wandb") for name in texts)
    for name, text in texts.items():
        for key in EXACT_KEYS:
            assert key not in text, f"{key} released in {name}"
    lines = progress_lines(proc.stdout)
    assert len(lines) == 6 and all("eps=" in line for line in lines)
    assert not [line for line in lines for key in EXACT_PROGRESS if key in line]
    assert "statistics released without DP" not in proc.stdout + proc.stderr

    # Public step metrics: epsilon, the schedule, throughput from the expected batch size.
    rows = [json.loads(line) for line in (run / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["train/expected_batch_size"] == 24 and r["perf/samples_per_s"] > 0 and r["privacy/epsilon"] > 0
               for r in rows)
    # eval_every=2: the evaluation split's loss and accuracy at steps 2 and 4 (6 is the phase's end,
    # evaluated after the loop), in metrics.jsonl, W&B and the progress lines.
    evaluated = [r["step"] for r in rows if "eval/validation/loss" in r and "eval/validation/accuracy" in r]
    assert evaluated == [2, 4]
    assert all(0 <= r["eval/validation/accuracy"] <= 1 and r["eval/validation/loss"] > 0
               for r in rows if r["step"] in (2, 4))
    assert "validation/loss=" in lines[1] and "validation/accuracy=" in lines[3]
    (offline,) = list((run / "teacher" / "wandb").glob("offline-run-*"))
    history = read_run(offline)["history"]
    assert [h["_step"] for h in history if "eval/validation/loss" in h] == [2, 4, 6]  # 6: the end-of-phase evaluation
    results = json.loads((run / "teacher" / "results.json").read_text())
    assert results["metrics"]["validation"]["loss"] > 0 and "statistics_released_without_dp" not in results
    assert set(results["head_init"]["pooler"]) == {"noise_multiplier", "clip_norm"}

    # The exported labels are the task's published schema.
    config = json.loads((run / "export" / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert "statistics released without DP" not in texts["report/privacy_report.md"] + report.stdout


def write_csv(path: Path, rows: list[tuple]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def _csv_task(tmp_path: Path) -> list[str]:
    """The generated set as csv files, evaluation rows that repeat a training text dropped, and a
    third class in the schema that no training row has."""
    data = generate(240, seed=0)
    seen = set(data.train.texts)
    held_out = data.eval["validation"]
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    write_csv(train, [(t, ["negative", "positive"][y]) for t, y in zip(data.train.texts, data.train.labels)])
    write_csv(dev, [(t, y) for t, y in zip(held_out.texts, held_out.labels) if t not in seen])
    return ["data.task=csv", f"data.train_file={train}", f"data.eval_file={dev}",
            "data.label_names=[negative,positive,unused]"]


@pytest.mark.timeout(600)
def test_release_exact_statistics_restores_them_and_marks_the_run(tmp_path):
    proc = ok(dpc(["pipeline", CONFIG, f"run.output_dir={tmp_path}", "run.name=debug", *TINY, *_csv_task(tmp_path),
                   "privacy.release_exact_statistics=true"], timeout=600))
    run = tmp_path / "debug"
    assert "WARNING: privacy.release_exact_statistics=true" in proc.stderr
    assert "WARNING: statistics released without DP" in proc.stdout
    rows = [json.loads(line) for line in (run / "teacher" / "metrics.jsonl").read_text().splitlines()]
    for key in ("train/loss", "train/batch_size", "privacy/clipped_fraction", "privacy/grad_norm_p50",
                "perf/tokens_per_s_rank0", "perf/realised_samples_per_s"):
        assert all(key in r for r in rows), key
    assert all(" loss=" in line and " batch=" in line and " clipped=" in line for line in progress_lines(proc.stdout))
    (offline,) = list((run / "teacher" / "wandb").glob("offline-run-*"))
    wandb_run = read_run(offline)
    assert any("train/loss" in h and "privacy/clipped_fraction" in h for h in wandb_run["history"])
    assert wandb_run["summary"]["statistics_released_without_dp"] is True
    results = json.loads((run / "teacher" / "results.json").read_text())
    assert results["statistics_released_without_dp"] is True and results["norm_methods"]
    assert 0 <= results["head_init"]["pooler"]["clipped_fraction"] <= 1
    assert 0 <= results["head_init"]["probe"]["clipped_fraction"] <= 1
    card = (run / "export" / "model" / "README.md").read_text()
    assert "statistics released without DP" in card and "Labels: negative, positive, unused" in card

    report = ok(dpc(["report", str(run)]))
    assert "statistics released without DP in teacher" in report.stdout
    md = (run / "report" / "privacy_report.md").read_text()
    assert "**WARNING: statistics released without DP** in phase(s) teacher" in md

    # The head and id2label follow data.label_names (three classes), not the two the training data holds.
    config = json.loads((run / "export" / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive", "2": "unused"}


@pytest.mark.timeout(600)
def test_evaluation_file_overlapping_the_training_file_is_refused_before_training(tmp_path):
    args = _csv_task(tmp_path)
    text = generate(240, seed=0).train.texts[5]
    with (tmp_path / "dev.csv").open("a", newline="") as fh:
        csv.writer(fh).writerow([text, "negative"])  # a training text, under another label
    proc = dpc(["train", CONFIG, f"run.output_dir={tmp_path}", "run.name=overlap", *RUN, *args], timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.eval_file: the evaluation file" in proc.stderr and "shares rows" in proc.stderr
    assert str(tmp_path / "train.csv") in proc.stderr
    assert not (tmp_path / "overlap" / "metrics.jsonl").exists() and not (tmp_path / "overlap" / "model").exists()


@pytest.mark.timeout(600)
def test_eval_every_runs_on_every_rank_under_zero3(tmp_path):
    # ZeRO-3 gathers each layer's parameters from all ranks in the forward: a rank that skipped the
    # evaluation would hang the others. Two gloo ranks, an evaluation at steps 2 and 4 of 6.
    from tests.engine.launch import torchrun

    out = torchrun("dist_dpc/train.py", [CONFIG, f"run.output_dir={tmp_path}", "run.name=z3", *RUN,
                                         "wandb.mode=disabled", "train.zero_stage=3", "train.eval_every=2"],
                   world_size=2, timeout=500)
    rows = [json.loads(line) for line in (tmp_path / "z3" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/validation/accuracy" in r] == [2, 4]
    assert "zero_stage=3" in out.stdout and not any(key in out.stdout for key in EXACT_PROGRESS)
