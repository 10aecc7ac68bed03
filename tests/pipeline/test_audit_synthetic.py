"""Canary secrets in synthetic text (`audit.synthetic_samples`): the text-only score against hand
cases, the bound's validity (text that carries no secret gives nothing) and power (text that repeats
the included canaries' secrets is caught), and `dpc audit` end to end on a DP causal LM with two ranks
at ZeRO 3 (synced generation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dist_dpc.pipeline.audit_synthetic import allocate, exposure_scores, secret_of
from dist_dpc.privacy.accounting import Mechanism
from dist_dpc.privacy.audit import audit_lower_bound
from tests.pipeline.test_train import ROOT, dpc, env


def test_exposure_scores_by_hand():
    secrets = ["3141592653", "2718281828", "1111111111"]
    texts = ["my secret code is 3 1 4 1 5 9 2 6 5 3 and more", "call 271-828 now", "nothing here"]
    scores = exposure_scores(secrets, texts)
    assert scores[0] == pytest.approx(10 + 1 / 2)  # whole, once (spacing does not hide it)
    assert scores[1] == pytest.approx(6 + 1 / 2)   # "271828" once
    assert scores[2] == pytest.approx(1 + 2 / 3)   # a single "1" in two texts
    assert secret_of("3 1 4 1 5") == "31415"
    assert exposure_scores(["12"], []).tolist() == [0.0]


def test_allocate_scales_prompts_by_largest_remainder():
    assert allocate({}, 7) == [((), 7)]
    got = allocate({"a\tx": 1, "b": 2}, 10)
    assert got == [(("a", "x"), 3), (("b",), 7)] and sum(n for _, n in got) == 10


def _secrets(rng, m):
    return ["".join(str(d) for d in rng.integers(0, 10, 10)) for _ in range(m)]


def test_text_without_secrets_gives_nothing_and_leaked_secrets_are_caught():
    rng = np.random.default_rng(0)
    m = 400
    secrets, included = _secrets(rng, m), rng.random(m) < 0.5
    noise = ["".join(str(d) for d in rng.integers(0, 10, 30)) for _ in range(200)]  # random digits, no leak
    mechanisms = [Mechanism(1.0, 0.05, 100)]
    clean = audit_lower_bound(exposure_scores(secrets, noise), included, 1e-4, test="f_dp", mechanisms=mechanisms)
    assert clean["epsilon_lb"] == 0.0
    # A model that leaked: every fourth included canary's secret appears whole in some sample.
    leaked = [s for s, inc in zip(secrets, included) if inc][::4]
    texts = noise + [f"my secret code is {' '.join(s)}" for s in leaked]
    caught = audit_lower_bound(exposure_scores(secrets, texts), included, 1e-4, test="f_dp", mechanisms=mechanisms)
    assert caught["epsilon_lb"] > 0.5, caught["tests"]


@pytest.mark.timeout(900)
def test_dpc_audit_synthetic_text_on_two_ranks_at_zero3(tmp_path):
    args = [str(ROOT / "configs" / "debug_lm.yaml"), f"run.output_dir={tmp_path}", "run.name=sy", "audit.kind=black_box",
            "audit.canaries=40", "data.synthetic_size=200", "train.zero_stage=3", "privacy.target_epsilon=2",
            "audit.synthetic_samples=24", "generate.batch_size=8", "generate.max_new_tokens=24", "wandb.mode=disabled",
            "privacy.randomness=insecure_reproducible"]
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "dist_dpc.train", "--phase", "audit", *args], capture_output=True, text=True, env=env(),
                          cwd=ROOT, timeout=850)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    audit = json.loads((tmp_path / "sy-audit" / "audit" / "audit.json").read_text())
    sy = audit["synthetic"]
    samples = [json.loads(line) for line in (tmp_path / "sy-audit" / "audit" / "synthetic.jsonl").read_text().splitlines()]
    assert sy["samples"] == len(samples) == 24 and [r["id"] for r in samples] == list(range(24))  # both ranks' shares
    assert len(sy["scores"]) == 40 and sy["secrets_whole_included"] == 0
    assert sy["epsilon_lb"] <= audit["claimed_epsilon"]
    assert all(0 <= s < 10 for s in sy["scores"])  # no secret whole in 24 short samples of a DP model
    assert "synthetic text (24 samples" in proc.stdout


def test_synthetic_samples_is_refused_for_a_classifier_and_the_white_box_audit(tmp_path):
    proc = dpc(["audit", str(ROOT / "configs" / "debug.yaml"), f"run.output_dir={tmp_path}", "audit.synthetic_samples=8"])
    assert proc.returncode != 0 and "audit.synthetic_samples needs audit.kind=black_box" in proc.stdout + proc.stderr
    proc = dpc(["audit", str(ROOT / "configs" / "debug.yaml"), f"run.output_dir={tmp_path}", "audit.kind=black_box",
                "audit.synthetic_samples=8", "wandb.mode=disabled"])
    assert proc.returncode != 0 and "needs a causal LM" in proc.stdout + proc.stderr
