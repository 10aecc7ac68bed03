"""A DP-LoRA teacher compressed in the same tree: distill and prune train a plain model (the teacher's
adapters merged), so with model.lora they must say what they train (distill.trainable,
prune.trainable); without it the pipeline and `dpc submit` refuse before anything trains."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.pipeline.test_phases import CONFIG, TINY, ok
from tests.pipeline.test_train import dpc

BITFIT = "[bias, LayerNorm, pooler, classifier]"


@pytest.mark.timeout(900)
def test_lora_teacher_then_bitfit_distill_and_prune(tmp_path):
    args = [CONFIG, f"run.output_dir={tmp_path}", "run.name=l", *TINY, "model.lora={r: 2, alpha: 4}",
            "privacy.target_epsilon=6", "pipeline.phases=[teacher, distill, prune]", "prune.rounds=1",
            "pipeline.budget_split={teacher: 0.5, distill: 0.25, prune: 0.25}"]
    for command in ("pipeline", "submit"):
        refused = dpc([command, *args], timeout=300)
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert "distill with model.lora" in refused.stderr and "distill.trainable" in refused.stderr
    assert not (tmp_path / "l" / "privacy_ledger.json").exists()  # refused before anything was spent

    refused = dpc(["pipeline", *args, f"distill.trainable={BITFIT}"], timeout=300)
    assert refused.returncode == 2 and "prune.trainable" in refused.stderr, refused.stderr[-2000:]

    # The student keeps teacher layer 1 as its layer 0; distill.trainable names the student's own
    # parameters: its layer 0's intermediate matrix trains besides DP-BiTFiT.
    student_bitfit = BITFIT[:-1] + r", 'layer\.0\.intermediate\.dense\.weight']"
    ok(dpc(["pipeline", *args, "distill.layer_map=[1]", f"distill.trainable={student_bitfit}",
            f"prune.trainable={BITFIT}"], timeout=800))
    run = tmp_path / "l"
    teacher = load_file(run / "teacher" / "model" / "model.safetensors")
    assert not any("lora" in name for name in teacher)  # saved merged: a plain model
    student = load_file(run / "distill" / "model" / "model.safetensors")
    pruned = load_file(run / "prune" / "model" / "model.safetensors")
    assert json.loads((run / "distill" / "results.json").read_text())["layer_map"] == [1]
    for suffix in ("attention.self.query", "intermediate.dense"):
        s, t = (f"bert.encoder.layer.{i}.{suffix}" for i in (0, 1))
        assert not torch.equal(student[f"{s}.bias"], teacher[f"{t}.bias"]), suffix
        weight_moved = not torch.equal(student[f"{s}.weight"], teacher[f"{t}.weight"])
        assert weight_moved == (suffix == "intermediate.dense"), suffix  # the other matrices stay the teacher's
    # Pruning zeroed half the matrix weights and trained only biases, LayerNorms and the head.
    q = "bert.encoder.layer.0.attention.self.query"
    kept = pruned[f"{q}.weight"] != 0
    assert 0.3 < float(kept.float().mean()) < 0.7
    # (prune.source=auto: the student, the last model before it)
    assert torch.equal(pruned[f"{q}.weight"][kept], student[f"{q}.weight"][kept])
    assert not torch.equal(pruned[f"{q}.bias"], student[f"{q}.bias"])
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    assert list(ledger["phases"]) == ["teacher", "distill", "prune"]


def test_tune_candidates_and_completed_phases_are_checked_before_anything_runs(tmp_path):
    from dist_dpc.pipeline.config import load_config
    from dist_dpc.pipeline.phases import check_phases

    base = [f"run.output_dir={tmp_path}", "run.name=t", "model.name=tiny-bert"]
    # No LoRA as given, but a tune candidate sets it: the distill phase after it would refuse.
    cfg = load_config(CONFIG, [*base, "tune.search={model.lora: [null, {r: 2}]}"])
    check_phases(cfg, ["teacher", "distill"])
    with pytest.raises(ValueError, match="distill.trainable"):
        check_phases(cfg, ["tune", "teacher", "distill"])
    check_phases(load_config(CONFIG, [*base, "tune.search={model.lora: [null, {r: 2}]}",
                                      f"distill.trainable={BITFIT}"]), ["tune", "teacher", "distill"])
    # A phase completed before (its results written) is not run again and not checked.
    lora = load_config(CONFIG, [*base, "model.lora={r: 2}"])
    with pytest.raises(ValueError, match="prune.trainable"):
        check_phases(lora, ["teacher", "prune", "eval"])
    (tmp_path / "t" / "prune").mkdir(parents=True)
    (tmp_path / "t" / "prune" / "results.json").write_text("{}")
    check_phases(lora, ["teacher", "prune", "eval"])
