"""DPKD loss against hand-computed values; student initialisation from the teacher's layers."""

from __future__ import annotations

import math

import pytest
import torch

from dist_dpc.compress import every_other_layer, kd_loss, student_from_teacher
from dist_dpc.models import ModelConfig, load_sequence_classifier


def test_kd_loss_hand_computed():
    student = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0]])
    labels = torch.tensor([0])
    alpha, temp = 0.25, 2.0
    # By hand: CE = -log(e^1 / (e^1 + e^0)); at T = 2 the softmaxes are of [0.5, 0] and [0, 1].
    ce = -math.log(math.e / (math.e + 1))
    pt = [1 / (1 + math.e), math.e / (1 + math.e)]
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps))
    expected = (1 - alpha) * ce + alpha * temp ** 2 * kl
    assert float(kd_loss(student, teacher, labels, alpha, temp)[0]) == pytest.approx(expected, rel=1e-6)
    # alpha 0 is plain CE; identical logits give zero KL.
    assert float(kd_loss(student, teacher, labels, 0.0, temp)[0]) == pytest.approx(ce, rel=1e-6)
    assert float(kd_loss(teacher, teacher, torch.tensor([1]), 1.0, temp)[0]) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="distill.alpha"):
        kd_loss(student, teacher, labels, 1.5, temp)


def test_kd_loss_is_per_sample():
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    y = torch.randint(0, 3, (5,))
    full = kd_loss(s, t, y, 0.5, 2.0)
    assert full.shape == (5,)
    assert torch.allclose(full[2:3], kd_loss(s[2:3], t[2:3], y[2:3], 0.5, 2.0))


@pytest.mark.parametrize("name, stack", [("tiny-bert", "bert.encoder.layer"), ("tiny-gpt2", "transformer.h"),
                                         ("tiny-llama", "model.layers")])
def test_student_copies_selected_layers_and_runs(name, stack):
    cfg = ModelConfig(name=name)
    teacher = load_sequence_classifier(cfg, num_labels=2, seed=0)
    # Give the debug teacher 4 layers by stacking copies, so "every other" keeps 1 and 3 (the last one).
    layers = teacher.get_submodule(stack)
    layers.extend([__import__("copy").deepcopy(layer) for layer in layers])
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            p.data.fill_(0.01 * (i + 1))
    count = "n_layer" if name == "tiny-gpt2" else "num_hidden_layers"
    setattr(teacher.config, count, 4)
    if isinstance(getattr(teacher.config, "layer_types", None), list):
        teacher.config.layer_types = teacher.config.layer_types * 2
    student = student_from_teacher(teacher)
    kept = student.get_submodule(stack)
    assert len(kept) == 2 and getattr(student.config, count) == 2 and every_other_layer(4) == [1, 3]
    assert all(float(p.detach().flatten()[0]) == pytest.approx(0.01 * (j * 2 + 2)) for j, layer in enumerate(kept) for p in layer.parameters())
    t_params = dict(teacher.named_parameters())
    for n, p in student.named_parameters():
        if stack not in n:  # embeddings, final norm, classifier: identical copies, not shared
            assert torch.equal(p, t_params[n]) and p.data_ptr() != t_params[n].data_ptr()
    out = student(input_ids=torch.randint(1, 100, (2, 5)), attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert out.logits.shape == (2, 2)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    with pytest.raises(ValueError, match="layer_map"):
        student_from_teacher(teacher, [0, 7])


@pytest.mark.parametrize("depth, expected", [(1, [0]), (2, [1]), (6, [1, 3, 5]), (7, [0, 2, 4, 6]), (12, [1, 3, 5, 7, 9, 11])])
def test_default_layer_map_keeps_every_other_layer_and_the_last(depth, expected):
    # The head was trained on the last layer's outputs: the default student keeps it, at half the depth
    # rounded up, the kept layers in the teacher's order.
    layers = every_other_layer(depth)
    assert layers == expected
    assert layers[-1] == depth - 1 and len(layers) == (depth + 1) // 2 and layers == sorted(set(layers))


@pytest.mark.timeout(600)
def test_dpkd_update_with_a_zero3_teacher_equals_the_per_example_reference(tmp_path):
    """ZeRO 3 on 2 real ranks with the teacher partitioned too (each rank holds half its weights, no
    optimizer state): one DPKD step (KL, CE and the hidden-state term; noise off) equals the
    per-example reference computed with the whole teacher in float64."""
    from dist_dpc.compress.distill import DistillationLoss
    from dist_dpc.models import ModelConfig, load_sequence_classifier
    from tests.engine.dp_worker import logical_batch
    from tests.engine.launch import run_worker
    from tests.reference import clipped_sum, per_example_grads

    seed, micro, lr, clip = 3, 3, 1000.0, 0.05
    distill = {"alpha": 0.6, "temperature": 2.0, "hidden_weight": 0.3, "layer_map": [0, 1], "sharded": True}
    case = {"model": "tiny-bert", "stage": 3, "clipping": "per_layer", "accumulation": 2, "noise_multiplier": 0.0,
            "max_grad_norm": clip, "micro_batch_size": micro, "lr": lr, "batch_size": 2 * 2 * micro - 1,
            "distill": distill}
    result = run_worker({"cases": [case], "expected_batch_size": 7, "seed": seed}, 2, tmp_path)["results"][0]
    teacher = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), num_labels=2, seed=seed + 1)
    total = sum(p.numel() for p in teacher.parameters())
    assert result["comms"]["teacher_local_numel"] <= total / 2 + 64  # its half (plus ZeRO-3 padding)

    student = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), num_labels=2, seed=seed).double()
    kd = DistillationLoss(teacher.double(), alpha=0.6, temperature=2.0, hidden_weight=0.3, layer_map=[0, 1])
    batch = logical_batch(student.config.vocab_size, case["batch_size"], 9, seed)
    grads = per_example_grads(student, batch, lambda model, one: kd(model, one))
    expected = {n: -lr * g / 7 for n, g in clipped_sum(student, grads, clip, "per_layer").items()}
    diff = torch.cat([(result["final"][n] - result["initial"][n] - d).flatten() for n, d in expected.items()])
    ref = torch.cat([d.flatten() for d in expected.values()])
    assert float(diff.norm() / ref.norm()) < 1e-5
