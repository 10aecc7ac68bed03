"""engine.partitioned on a model built under deepspeed.zero.Init on 2 real ranks (gloo): forwards,
state dicts, pruning masks and sparsity computed one tensor or module at a time equal plain torch on
the same weights loaded whole (issue 16: the pipeline builds its models partitioned at ZeRO 3)."""

import torch

from dist_dpc.models import ModelConfig, load_sequence_classifier
from tests.engine.launch import torchrun


def test_partitioned_views_equal_the_whole_model_on_two_ranks(tmp_path):
    model = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), 3, None, seed=0)
    model.save_pretrained(tmp_path / "model")
    torchrun("tests/engine/partitioned_worker.py", [str(tmp_path / "model"), str(tmp_path / "out.pt")], world_size=2,
             timeout=300)
    r = torch.load(tmp_path / "out.pt", weights_only=False)
    assert r["all_partitioned"] and r["whole"] == r["plain_numel"]
    assert r["local"] < 0.6 * r["whole"]  # rank 0 holds about half (each tensor split in two, padded)
    torch.testing.assert_close(r["logits"], r["plain_logits"], rtol=1e-5, atol=1e-6)
    assert r["placeholders_after_forward"] and r["one_at_a_time_sizes"]
    assert r["parted_state"].keys() == r["plain_state"].keys()
    for name, value in r["plain_state"].items():
        torch.testing.assert_close(r["parted_state"][name], value, rtol=0, atol=0, msg=name)
    for method in ("unstructured", "2:4"):
        masks, plain = r[f"masks_{method}"], r[f"plain_masks_{method}"]
        assert masks.keys() == plain.keys() and all(torch.equal(masks[n], plain[n]) for n in masks), method
        kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert abs(kept - 0.5) < 0.01, (method, kept)  # both patterns keep half: the masks are not trivial
    assert r["stats"] == r["plain_stats"] and r["stats"]["prunable_sparsity"] > 0.49
    for name, value in r["plain_masked_state"].items():
        if "classifier.bias" not in name:
            torch.testing.assert_close(r["masked_state"][name], value, rtol=0, atol=0, msg=name)
    assert torch.equal(r["bias_seen"], torch.ones_like(r["bias_seen"]))  # rank 0's value on both ranks
