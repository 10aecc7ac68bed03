"""A run interrupted and resumed from its checkpoint continues bit-identically, with the same epsilon."""

from __future__ import annotations

import pytest
import torch

from tests.engine.launch import run_worker


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_is_bit_identical(stage, tmp_path):
    base = {"model": "tiny-bert", "stage": stage, "clipping": "per_layer", "accumulation": 2, "micro_batch_size": 3,
            "lr": 1e-2, "optimizer": "adamw", "max_grad_norm": 1.0, "batch_size": 9, "steps": 4}
    cases = []
    for noise in (0.0, 0.8):  # noise off: the maths; noise on: the (seed, step, rank) noise streams too
        cases.append(dict(base, noise_multiplier=noise))
        cases.append(dict(base, noise_multiplier=noise, resume_at=2))
    spec = {"cases": cases, "expected_batch_size": 7, "seed": 9, "checkpoint_dir": str(tmp_path / "ckpt")}
    results = run_worker(spec, 2, tmp_path, timeout=800)["results"]
    for straight, resumed in ((results[0], results[1]), (results[2], results[3])):
        for name, value in straight["final"].items():
            assert torch.equal(value, resumed["final"][name]), name
        assert straight["epsilon"] == resumed["epsilon"]
        assert straight["accountant"]["history"] == resumed["accountant"]["history"]
    assert results[0]["epsilon"] == float("inf") or results[0]["epsilon"] > 0
    # The noisy run moved somewhere else than the noiseless one: noise was really applied after resume.
    assert any(not torch.equal(results[1]["final"][n], results[3]["final"][n]) for n in results[1]["final"])
