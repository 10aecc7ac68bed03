"""DPIMP masks against brute-force references; masks held exactly under real DP-SGD steps; layer removal."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from dist_dpc.compress.distill import DistillationLoss, kd_loss, student_from_teacher, transformer_layers
from dist_dpc.compress.pruning import (MaskEnforcer, apply_masks, compute_masks, depth_schedule, drop_layers,
                                       global_magnitude_masks, layer_importance, prunable_weights,
                                       sparsity_schedule, two_four_masks)
from dist_dpc.models import ModelConfig, load_sequence_classifier


def tiny(name="tiny-bert", layers=None):
    model = load_sequence_classifier(ModelConfig(name=name), 2, None, seed=0)
    return model


def test_global_magnitude_masks_match_a_sorted_reference():
    torch.manual_seed(0)
    weights = {"a": torch.randn(7, 5), "b": torch.randn(3, 11) * 0.1, "c": torch.randn(4, 4) * 3}
    masks = global_magnitude_masks(weights, 0.4)
    everything = torch.cat([w.abs().flatten() for w in weights.values()])
    k = round(0.4 * everything.numel())
    threshold = everything.sort().values[k - 1]  # the k smallest magnitudes go (no ties with randn)
    for name, w in weights.items():
        assert torch.equal(masks[name], w.abs() > threshold)
    assert sum(int((~m).sum()) for m in masks.values()) == k
    # Global, not per layer: the small-scale matrix loses far more than the large one.
    assert (~masks["b"]).float().mean() > 0.9 and (~masks["c"]).float().mean() < 0.2
    # Iterative: already-pruned weights stay pruned even if they were larger.
    prev = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    prev["c"][0, 0] = False
    again = global_magnitude_masks(weights, 0.4, previous=prev)
    assert not again["c"][0, 0] and sum(int((~m).sum()) for m in again.values()) == k


def tied_weights():
    """Matrices whose magnitudes take a handful of values (many ties at any threshold), signed zeros,
    and an earlier round's masks that pruned some large weights."""
    g = torch.Generator().manual_seed(5)
    weights = {"a": torch.randint(-3, 4, (7, 5), generator=g).float() * 0.5,
               "b": torch.randint(-2, 3, (3, 11), generator=g).float() * 0.25,
               "c": torch.randint(-4, 5, (4, 4), generator=g).float()}
    weights["a"][0, :2] = torch.tensor([0.0, -0.0])
    previous = {n: torch.rand(w.shape, generator=g) > 0.2 for n, w in weights.items()}
    return weights, previous


def sorted_reference(weights, sparsity, previous):
    """Prune the round(sparsity * n) smallest scores of the concatenation (earlier-pruned first),
    ties in order of position: a stable sort, independent of the bisection."""
    scores = torch.cat([torch.where(previous[n].flatten(), w.abs().flatten(), torch.tensor(-1.0))
                        for n, w in weights.items()])
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.sort(scores, stable=True).indices[:round(sparsity * scores.numel())]] = False
    return dict(zip(weights, [k.view_as(w) for k, w in zip(keep.split([w.numel() for w in weights.values()]),
                                                            weights.values())]))


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.55, 0.9])
def test_magnitude_masks_break_ties_by_position(sparsity):
    weights, previous = tied_weights()
    masks = global_magnitude_masks(weights, sparsity, previous)
    expected = sorted_reference(weights, sparsity, previous)
    for name in weights:
        assert torch.equal(masks[name], expected[name]), name


def test_magnitude_masks_are_the_same_at_every_world_size(tmp_path):
    """3 real ranks (gloo), each ranking a third of the coordinates: the same masks as one process
    and as the sorted reference, ties included."""
    from tests.engine.launch import torchrun

    out = tmp_path / "masks.pt"
    torchrun("tests/compress/threshold_worker.py", [str(out)], world_size=3, timeout=300)
    got = torch.load(out)
    weights, previous = tied_weights()
    for sparsity, masks in got.items():
        expected = sorted_reference(weights, sparsity, previous)
        for name in weights:
            assert torch.equal(masks[name], expected[name]), (sparsity, name)


def test_magnitude_masks_refuse_non_finite_weights():
    with pytest.raises(ValueError, match="non-finite"):
        global_magnitude_masks({"w": torch.tensor([[1.0, float("nan")]])}, 0.5)


def test_two_four_masks_keep_the_two_largest_of_every_four():
    torch.manual_seed(1)
    w = torch.randn(6, 16)
    mask = two_four_masks({"w": w}, {"w": 1})["w"]
    for row, group in itertools.product(range(6), range(4)):
        block = w[row, 4 * group:4 * group + 4].abs()
        expected = set(block.argsort(descending=True)[:2].tolist())
        assert set(torch.nonzero(mask[row, 4 * group:4 * group + 4]).flatten().tolist()) == expected
    # GPT-2's Conv1D stores (in, out): the groups run along dim 0 there.
    maskT = two_four_masks({"w": w.T.contiguous()}, {"w": 0})["w"]
    assert torch.equal(maskT, mask.T)
    with pytest.raises(ValueError, match="multiple of 4"):
        two_four_masks({"w": torch.randn(2, 6)}, {"w": 1})


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_prunable_weights_are_the_blocks_matrices(name):
    model = tiny(name)
    names = list(prunable_weights(model))
    assert names and all(".weight" in n for n in names)
    assert not any(k in n for n in names for k in ("embed", "wte", "wpe", "classifier", "score", "pooler", "norm"))
    masks = compute_masks(model, "unstructured", 0.5)
    apply_masks(model, masks)
    zeros = sum(int((w == 0).sum()) for w in prunable_weights(model).values())
    total = sum(w.numel() for w in prunable_weights(model).values())
    assert zeros == round(0.5 * total)


def test_schedules():
    assert depth_schedule(6, 3, 3) == [5, 4, 3]
    assert depth_schedule(6, 3, 1) == [3]
    assert sparsity_schedule(0.5, 2) == [0.25, 0.5]


def test_drop_layers_keeps_the_largest_layers_in_order():
    model = load_sequence_classifier(ModelConfig(name="tiny-bert"), 2, None, seed=0)
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=32, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    layers, _ = transformer_layers(model)
    with torch.no_grad():
        for i, scale in enumerate([1.0, 0.1, 3.0, 0.5]):
            for p in layers[i].parameters():
                p.mul_(scale)
    scores = layer_importance(model)
    assert scores.index(max(scores)) == 2 and scores.index(min(scores)) == 1
    small, keep = drop_layers(model, 2, keep_last=False)
    assert keep == [0, 2] and small.config.num_hidden_layers == 2
    ref = dict(layers[2].named_parameters())
    for n, p in transformer_layers(small)[0][1].named_parameters():
        assert torch.equal(p, ref[n])
    ids, mask = torch.randint(0, 100, (3, 7)), torch.ones(3, 7, dtype=torch.long)
    assert small(input_ids=ids, attention_mask=mask).logits.shape == (3, 2)
    # keep_last (the default): layer 3 ranks below layer 0 but stays; the best of the others joins it.
    small, keep = drop_layers(model, 2)
    assert keep == [2, 3] and small.config.num_hidden_layers == 2
    assert all(torch.equal(a, b) for a, b in zip(transformer_layers(small)[0][1].parameters(), layers[3].parameters()))
    assert drop_layers(model, 1)[1] == [3] and drop_layers(model, 1, keep_last=False)[1] == [2]
    # The kept layers compute what the same layers of the original compute, in the same order.
    with torch.no_grad():
        hidden = model.bert.embeddings(input_ids=ids)
        for i in keep:
            out = layers[i](hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        expected = model.classifier(model.bert.pooler(hidden))
        assert torch.allclose(small(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5)


def test_distillation_loss_matches_kd_loss_and_hidden_mse():
    teacher = tiny().eval()
    student = student_from_teacher(teacher, [1])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = {"input_ids": torch.randint(0, 1000, (4, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 3 + [0] * 3] * 2),
             "labels": torch.tensor([0, 1, 1, 0])}
    loss = DistillationLoss(teacher, alpha=0.3, temperature=2.0, hidden_weight=0.5, layer_map=[1])
    got = loss(student, batch)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    t = teacher(**inputs, output_hidden_states=True)
    s = student(**inputs, output_hidden_states=True)
    expected = kd_loss(s.logits, t.logits, batch["labels"], 0.3, 2.0)
    for i in range(4):  # per sample, by an explicit loop over real tokens
        real = batch["attention_mask"][i].bool()
        diff = (s.hidden_states[1][i][real] - t.hidden_states[2][i][real]) ** 2
        expected[i] += 0.5 * diff.mean()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert got.shape == (4,) and not any(p.requires_grad for p in teacher.parameters())


def _engine(model, zero_stage, noise_multiplier=1.0, bf16=False):
    from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
    from dist_dpc.engine.losses import sequence_classification_loss
    from dist_dpc.privacy import PrivacyConfig
    from dist_dpc.privacy.randomness import SecretKey

    world = init_distributed()
    privacy = PrivacyConfig(target_epsilon=None, noise_multiplier=noise_multiplier, delta=1e-5)
    ds = build_ds_config(None, micro_batch_size=8, world_size=1, zero_stage=zero_stage, lr=1e-2, weight_decay=0.1,
                         optimizer="adamw", bf16=bf16, dp_enabled=True)
    return DPEngine(model, ds, privacy, dataset_size=1000, expected_batch_size=8, planned_steps=10,
                    loss_fn=sequence_classification_loss, world=world, key=SecretKey.from_seed(3))


@pytest.mark.timeout(300)
def test_masks_stay_exactly_zero_under_noisy_dp_steps():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    model = tiny()
    masks = compute_masks(model, "unstructured", 0.5)
    apply_masks(model, masks)
    before = {n: p.detach().clone() for n, p in prunable_weights(model).items()}
    enforcer = MaskEnforcer(model, masks)
    engine = _engine(model, zero_stage=0)
    enforcer.bind(engine)
    assert enforcer.partitions is None  # ZeRO 0 in fp32: the optimizer steps the module's own weights
    # One byte a weight, the caller's own masks: no float copy of every mask per rank.
    held = {id(m) for _, m in enforcer.pairs + enforcer.on_device}
    assert held == {id(m) for m in masks.values()} and all(m.dtype == torch.bool for m in masks.values())
    batch = {"input_ids": torch.randint(0, 1000, (8, 6)), "attention_mask": torch.ones(8, 6, dtype=torch.long),
             "token_type_ids": torch.zeros(8, 6, dtype=torch.long), "labels": torch.randint(0, 2, (8,)),
             "sample_mask": torch.ones(8)}
    for _ in range(3):
        engine.train_step([batch], 8)
    after = prunable_weights(engine.module)
    assert enforcer.violations() == 0
    for n, m in masks.items():
        assert torch.count_nonzero(after[n][~m]) == 0          # pruned: exactly zero despite noise and decay
        assert not torch.equal(after[n][m], before[n][m])       # kept: trained


def test_an_enforcer_masks_gradients_before_it_is_bound():
    layer = torch.nn.Linear(4, 4, bias=False)
    mask = torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    enforcer = MaskEnforcer(torch.nn.Sequential(layer), {"0.weight": mask})
    layer.weight.grad = torch.ones(4, 4)
    enforcer(torch.optim.SGD(layer.parameters(), lr=0.1))
    assert torch.equal(layer.weight.grad, mask.float())


def test_frozen_matrices_are_pruned_and_stay_zero():
    model = tiny()
    for name, p in model.named_parameters():
        p.requires_grad_("bias" in name or "classifier" in name)
    masks = compute_masks(model, "unstructured", 0.5)
    assert masks and set(masks) == set(prunable_weights(model))
    apply_masks(model, masks)
    enforcer = MaskEnforcer(model, masks)
    assert not enforcer.pairs and enforcer.violations() == 0
    engine = _engine(model, zero_stage=0)
    enforcer.bind(engine)  # nothing trainable to follow
    batch = {"input_ids": torch.randint(0, 1000, (8, 6)), "attention_mask": torch.ones(8, 6, dtype=torch.long),
             "token_type_ids": torch.zeros(8, 6, dtype=torch.long), "labels": torch.randint(0, 2, (8,)),
             "sample_mask": torch.ones(8)}
    engine.train_step([batch], 8)
    assert enforcer.violations() == 0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage, bf16, method, labels", [
    (1, False, "unstructured", 2),
    (3, True, "2:4", 3),  # 3 labels: the head's bias (3) does not split evenly over 2 ranks (ZeRO-3 padding)
    # the other stage/precision pairs: `make test-slow` (same code path, one more mapping each)
    pytest.param(2, True, "2:4", 2, marks=pytest.mark.slow),
    pytest.param(3, False, "unstructured", 3, marks=pytest.mark.slow)])
def test_masks_follow_deepspeed_partitions_on_two_ranks(tmp_path, stage, bf16, method, labels):
    """ZeRO 1-3 and bf16 step flat fp32 partitions: each rank enforces the masks of its own. After
    noisy steps every pruned coordinate is exactly zero and kept ones trained."""
    from tests.engine.launch import torchrun

    out = tmp_path / "out.pt"
    torchrun("tests/compress/prune_worker.py", [str(out), str(stage), "1" if bf16 else "0", method, str(labels)],
             world_size=2, timeout=500)
    got = torch.load(out)
    assert got["partitioned"] and got["violations"] == 0
    assert got["partition_mask_dtypes"] == ["torch.bool"]  # one byte a coordinate of the rank's partition
    reference = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), labels, None, seed=0)
    # Ranked by the two ranks together (each its half of the coordinates): the one-process masks.
    serial = compute_masks(reference, method, 0.5)
    assert all(torch.equal(got["masks"][n], serial[n]) for n in serial)
    start = {n: p.detach().clone().double() for n, p in reference.named_parameters()}
    for name, mask in got["masks"].items():
        weight = got["params"][name]
        assert torch.count_nonzero(weight[~mask]) == 0, name
        moved = (weight[mask] != start[name][mask]).float().mean()
        assert moved > 0.9, (name, moved)  # kept coordinates trained (almost all of them moved)


def test_bf16_pruning_at_zero0_is_refused_up_front():
    """DeepSpeed's bf16 optimizer at ZeRO 0 keeps no per-parameter map to its fp32 copy: refused
    with the settings to change, before any step."""
    model = tiny()
    masks = compute_masks(model, "unstructured", 0.5)
    apply_masks(model, masks)
    engine = _engine(model, zero_stage=0, bf16=True)
    with pytest.raises(ValueError, match="train.zero_stage >= 1"):
        MaskEnforcer(model, masks).bind(engine)
