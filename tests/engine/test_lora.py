"""DP-LoRA (peft adapters, model.lora): with noise off, the DP update of the adapters and the head
equals the per-example reference at ZeRO 0, 2 and 3, flat and per-layer; the pre-trained weights do not
move; the saved model is the merged plain model."""

from __future__ import annotations

import pytest
import torch

from tests.engine.dp_worker import logical_batch, with_test_lora
from tests.engine.test_equivalence import EXPECTED_BATCH, MAX_GRAD_NORM, MICRO, SEED, update_error
from tests.reference import classifier_loss, clipped_sum, per_example_grads


def cases() -> list[dict]:
    return [{"model": "tiny-bert", "lora": 2, "stage": stage, "clipping": clipping, "accumulation": 2,
             "noise_multiplier": 0.0, "max_grad_norm": MAX_GRAD_NORM, "micro_batch_size": MICRO, "lr": 1000.0,
             "batch_size": 2 * MICRO - 1}
            for stage in (0, 2, 3) for clipping in ("flat", "per_layer")]


def reference(case: dict) -> dict[str, torch.Tensor]:
    model = with_test_lora(case["model"], SEED, case["lora"]).double()
    batch = logical_batch(model.config.vocab_size, case["batch_size"], 9, SEED)
    grads = per_example_grads(model, batch, classifier_loss)
    total = clipped_sum(model, grads, case["max_grad_norm"], case["clipping"])
    return {n: -case["lr"] * g / EXPECTED_BATCH for n, g in total.items()}


@pytest.mark.timeout(600)
def test_dp_lora_update_equals_per_example_reference(tmp_path):
    from tests.engine.launch import run_worker

    spec = {"cases": cases(), "expected_batch_size": EXPECTED_BATCH, "seed": SEED}
    out = run_worker(spec, 1, tmp_path, timeout=500)
    for case, result in zip(spec["cases"], out["results"]):
        expected = reference(case)
        trained = set(expected)
        assert trained and all("lora_" in n or "classifier" in n or "pooler" in n for n in trained)
        assert any("lora_A" in n for n in trained) and any("lora_B" in n for n in trained)
        assert update_error(result, expected) < 1e-5, (case["stage"], case["clipping"])
        frozen = [n for n in result["initial"] if n not in trained]
        assert frozen and all(torch.equal(result["initial"][n], result["final"][n]) for n in frozen)


def test_saved_lora_model_is_the_merged_plain_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from dist_dpc.models.loading import merged_for_saving

    model = with_test_lora("tiny-bert", SEED, 2).eval()
    batch = logical_batch(model.config.vocab_size, 4, 9, SEED)
    plain = merged_for_saving(model)
    plain.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels" and k != "sample_mask"}
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, again(**inputs).logits, atol=1e-5)
    assert not any("lora" in n for n, _ in again.named_parameters())
    assert any("lora" in n for n, _ in model.named_parameters())  # the copy was merged, not the model
