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

    ok(dpc(["pipeline", *args, f"distill.trainable={BITFIT}", f"prune.trainable={BITFIT}"], timeout=800))
    run = tmp_path / "l"
    teacher = load_file(run / "teacher" / "model" / "model.safetensors")
    assert not any("lora" in name for name in teacher)  # saved merged: a plain model
    student = load_file(run / "distill" / "model" / "model.safetensors")
    pruned = load_file(run / "prune" / "model" / "model.safetensors")
    layer_map = json.loads((run / "distill" / "results.json").read_text())["layer_map"]
    moved = {"bias": 0, "matrix": 0}
    for i, j in enumerate(layer_map):
        for suffix in ("attention.self.query", "intermediate.dense"):
            for kind in ("weight", "bias"):
                s = student[f"bert.encoder.layer.{i}.{suffix}.{kind}"]
                t = teacher[f"bert.encoder.layer.{j}.{suffix}.{kind}"]
                if kind == "weight":
                    assert torch.equal(s, t), (i, suffix)  # DP-BiTFiT: the student's matrices stay the teacher's
                else:
                    moved["bias"] += int(not torch.equal(s, t))
    assert moved["bias"] > 0
    # Pruning zeroed half the matrix weights and trained only biases, LayerNorms and the head.
    q = "bert.encoder.layer.0.attention.self.query"
    kept = pruned[f"{q}.weight"] != 0
    assert 0.3 < float(kept.float().mean()) < 0.7
    assert torch.equal(pruned[f"{q}.weight"][kept], teacher[f"{q}.weight"][kept])
    assert not torch.equal(pruned[f"{q}.bias"], teacher[f"{q}.bias"])
    ledger = json.loads((run / "privacy_ledger.json").read_text())
    assert list(ledger["phases"]) == ["teacher", "distill", "prune"]
