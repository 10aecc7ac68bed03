"""Causal LMs under the DP engine: with noise off, one DP-SGD step with the LM loss (text tokens only,
prefix and padding excluded) equals the per-example reference, for tiny-gpt2 (Conv1D), tiny-llama
(RMSNorm, rotary, grouped-query attention) and tiny-llama with DP-LoRA, at ZeRO 0-3 on 2 real ranks.

Tolerance: 1e-5 relative as the classifier tests, except 1e-4 where an LM head of 257 outputs is
trained: its ghost norms carry the float32 rounding bound (dist_dpc.privacy.per_sample.
ghost_rounding_bound, ~(I + O) u of the Gram terms), which makes the engine clip those layers by a
relative ~3e-5 more than the exact float64 reference. That direction is checked: the engine's update
is never longer than the reference's."""

from __future__ import annotations

import pytest
import torch

from tests.engine.dp_worker import causal_lm_case, lm_batch
from tests.engine.test_equivalence import EXPECTED_BATCH, MAX_GRAD_NORM, MICRO, SEED, update_error
from tests.reference import clipped_sum, lm_loss, per_example_grads

WORLD = 2


def cases() -> list[dict]:
    out = []
    for model, lora in (("tiny-gpt2", 0), ("tiny-llama", 0), ("tiny-llama", 2)):
        # flat at ZeRO 1 and 3 (its book-keeping hand-over gathers partitioned weights there), per_layer at all.
        for stage, clipping in ((0, "per_layer"), (1, "flat"), (2, "per_layer"), (3, "per_layer"), (3, "flat")):
            out.append({"task": "causal_lm", "model": model, "lora": lora, "stage": stage,
                        "clipping": clipping, "accumulation": 2,
                        "noise_multiplier": 0.0, "max_grad_norm": MAX_GRAD_NORM, "micro_batch_size": MICRO,
                        "lr": 1000.0, "batch_size": WORLD * 2 * MICRO - 1})
    return out


def reference(case: dict) -> dict[str, torch.Tensor]:
    model, _ = causal_lm_case(case, SEED)
    model = model.double()
    batch = lm_batch(model.config.vocab_size, case["batch_size"], 9, SEED)
    grads = per_example_grads(model, batch, lm_loss)
    total = clipped_sum(model, grads, case["max_grad_norm"], case["clipping"])
    return {n: -case["lr"] * g / EXPECTED_BATCH for n, g in total.items()}


def test_reference_loss_ignores_prefix_and_padding():
    """The reference's premise, checked on the real loss: changing a token whose label is -100 as a
    target (prefix) or any padded position changes nothing the loss sees beyond its role as context."""
    from dist_dpc.engine.losses import causal_lm_loss

    model, _ = causal_lm_case({"model": "tiny-llama", "lora": 0}, SEED)
    batch = lm_batch(model.config.vocab_size, 6, 9, SEED)
    torch.testing.assert_close(causal_lm_loss(model, batch), lm_loss(model, batch))
    padded = batch["attention_mask"] == 0
    assert padded.any()
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(padded, 7))
    torch.testing.assert_close(causal_lm_loss(model, other), causal_lm_loss(model, batch))


@pytest.mark.timeout(900)
def test_lm_dp_update_equals_per_example_reference(tmp_path):
    from tests.engine.launch import run_worker

    spec = {"cases": cases(), "expected_batch_size": EXPECTED_BATCH, "seed": SEED}
    out = run_worker(spec, WORLD, tmp_path, timeout=800)
    failures = []
    for case, result in zip(spec["cases"], out["results"]):
        expected = reference(case)
        err = update_error(result, expected)
        tolerance = 1e-5 if case["lora"] else 1e-4
        got = torch.cat([(result["final"][n] - result["initial"][n]).flatten() for n in expected])
        ref = torch.cat([d.flatten() for d in expected.values()])
        if err > tolerance or float(got.norm()) > float(ref.norm()) * (1 + 1e-6):
            failures.append((case["model"], case["lora"], case["stage"], case["clipping"], err,
                             float(got.norm() / ref.norm())))
        if case["lora"]:
            assert set(expected) and all("lora_" in n for n in expected), sorted(expected)
            frozen = [n for n in result["initial"] if n not in expected]
            assert frozen and all(torch.equal(result["initial"][n], result["final"][n]) for n in frozen)
    assert not failures, failures
