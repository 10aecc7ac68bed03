"""Two real ranks: the noise each coordinate receives, and the collectives a DP step issues."""

from __future__ import annotations

import pytest
import torch

from tests.engine.launch import run_worker

SIGMA, C, B = 1.0, 1.0, 7
BASE = {"model": "tiny-bert", "accumulation": 2, "micro_batch_size": 3, "lr": 1.0, "max_grad_norm": C}


def noise_cases():
    # batch_size 0: every row is padding, so the clipped sum is exactly zero and the update is pure noise.
    return [dict(BASE, stage=stage, clipping="per_layer", noise_multiplier=SIGMA, batch_size=0, kind="noise")
            for stage in (0, 1, 2, 3)]


def comm_cases():
    out = []
    for stage in (0, 1, 2, 3):
        for private, clipping in ((False, "per_layer"), (True, "per_layer"), (True, "flat")):
            # 3 steps, the last one counted: at ZeRO 3 the first step's bypass self-test is a pass of another
            # module order than flat's, so DeepSpeed re-records its module trace once (a few broadcasts) in step 2.
            out.append(dict(BASE, stage=stage, clipping=clipping, noise_multiplier=0.5, batch_size=11, comms=True,
                            steps=3, private=private, kind="comms"))
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    cases = noise_cases() + comm_cases()
    out = run_worker({"cases": cases, "expected_batch_size": B, "seed": 5}, 2, tmp_path_factory.mktemp("w2"), timeout=800)
    return list(zip(cases, out["results"], zip(*out["per_rank"])))


@pytest.mark.timeout(900)
def test_every_coordinate_gets_one_draw_of_std_sigma_c_over_b(two_ranks):
    expected_std = SIGMA * C / B
    for case, result, per_rank in two_ranks:
        if case["kind"] != "noise":
            continue
        updates = {n: result["final"][n] - result["initial"][n] for n in result["final"]}
        flat = torch.cat([u.flatten() for u in updates.values()])
        # Zero draws would leave exact zeros; two draws would give std * sqrt(2) on that slice.
        assert int((flat == 0).sum()) == 0, case["stage"]
        for name, u in updates.items():
            if u.numel() >= 2000:
                rel = abs(float(u.std()) / expected_std - 1)
                assert rel < 0.03, (case["stage"], name, float(u.std()), expected_std)
        assert abs(float(flat.std()) / expected_std - 1) < 0.01, case["stage"]
        assert abs(float(flat.mean())) < 4 * expected_std / flat.numel() ** 0.5
        # Both ranks end with identical parameters: at ZeRO 0 each applied the same noise to its replica.
        for name in result["final"]:
            assert torch.equal(per_rank[0]["final"][name], per_rank[1]["final"][name]), (case["stage"], name)
        streams = {r["noise_stream"] for r in per_rank}
        assert streams == ({0} if case["stage"] == 0 else {0, 1}), (case["stage"], streams)


@pytest.mark.timeout(900)
def test_partitions_get_independent_noise(two_ranks):
    for case, result, _ in two_ranks:
        if case["kind"] != "noise" or case["stage"] == 0:
            continue
        flat = torch.cat([(result["final"][n] - result["initial"][n]).flatten() for n in result["final"]]).float()
        # If both ranks drew from the same stream, each value of one partition would reappear in the other.
        _, counts = torch.unique(flat, return_counts=True)
        duplicated = float(counts[counts > 1].sum()) / flat.numel()
        assert duplicated < 0.01, (case["stage"], duplicated)
        half = flat.numel() // 2
        corr = torch.corrcoef(torch.stack([flat[:half], flat[half:2 * half]]))[0, 1]
        assert abs(float(corr)) < 4 / half ** 0.5


@pytest.mark.timeout(900)
def test_dp_step_issues_the_same_collectives_as_a_non_dp_step(two_ranks):
    by_stage = {}
    for case, result, _ in two_ranks:
        if case["kind"] == "comms":
            label = "non-dp" if not case["private"] else case["clipping"]
            by_stage.setdefault(case["stage"], {})[label] = result["comms"]
    for stage, comms in by_stage.items():
        assert comms["non-dp"], f"stage {stage}: the comms logger recorded nothing"
        # One forward + one backward per micro-batch in both modes (flat's hand-over runs inside the same
        # engine forward and backward): exactly DeepSpeed's own collectives (same ops, same sizes).
        assert comms["per_layer"] == comms["non-dp"], (stage, comms)
        assert comms["flat"] == comms["non-dp"], (stage, comms)
