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


def _dpkd_step_against_the_reference(tmp_path, *, stage: int, clipping: str, distill: dict) -> dict:
    """One DPKD step on 2 real ranks (noise off) against the per-example reference computed with
    the whole teacher in float64, each example alone; returns the worker's result."""
    from dist_dpc.compress.distill import DistillationLoss
    from dist_dpc.models import ModelConfig, load_sequence_classifier
    from tests.engine.dp_worker import logical_batch
    from tests.engine.launch import run_worker
    from tests.reference import clipped_sum, per_example_grads

    seed, micro, lr, clip = 3, 3, 1000.0, 0.05
    case = {"model": "tiny-bert", "stage": stage, "clipping": clipping, "accumulation": 2, "noise_multiplier": 0.0,
            "max_grad_norm": clip, "micro_batch_size": micro, "lr": lr, "batch_size": 2 * 2 * micro - 1,
            "distill": distill}
    result = run_worker({"cases": [case], "expected_batch_size": 7, "seed": seed}, 2, tmp_path)["results"][0]
    teacher = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), num_labels=2, seed=seed + 1)
    student = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), num_labels=2, seed=seed).double()
    kd = DistillationLoss(teacher.double(), alpha=distill["alpha"], temperature=distill["temperature"],
                          hidden_weight=distill["hidden_weight"], layer_map=distill["layer_map"])
    batch = logical_batch(student.config.vocab_size, case["batch_size"], 9, seed)
    grads = per_example_grads(student, batch, lambda model, one: kd(model, one))
    expected = {n: -lr * g / 7 for n, g in clipped_sum(student, grads, clip, clipping).items()}
    diff = torch.cat([(result["final"][n] - result["initial"][n] - d).flatten() for n, d in expected.items()])
    ref = torch.cat([d.flatten() for d in expected.values()])
    assert float(diff.norm() / ref.norm()) < 1e-5
    return result


@pytest.mark.timeout(600)
def test_dpkd_update_with_a_zero3_teacher_equals_the_per_example_reference(tmp_path):
    """ZeRO 3 on 2 real ranks with the teacher partitioned too (each rank holds half its weights, no
    optimizer state): one DPKD step (KL, CE and the hidden-state term, so the teacher runs on each
    micro-batch; noise off) equals the per-example reference."""
    from dist_dpc.models import ModelConfig, load_sequence_classifier

    distill = {"alpha": 0.6, "temperature": 2.0, "hidden_weight": 0.3, "layer_map": [0, 1], "sharded": True}
    result = _dpkd_step_against_the_reference(tmp_path, stage=3, clipping="per_layer", distill=distill)
    teacher = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), num_labels=2, seed=4)
    total = sum(p.numel() for p in teacher.parameters())
    assert result["comms"]["teacher_local_numel"] <= total / 2 + 64  # its half (plus ZeRO-3 padding)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage, clipping, sharded", [(3, "per_layer", True), (0, "flat", False)])
def test_dpkd_update_from_the_teacher_logits_table_equals_the_per_example_reference(tmp_path, stage, clipping, sharded):
    """The pipeline's default DPKD path (no hidden-state term): the teacher's logits come from a
    table looked up by each row's example_index, on 2 real ranks whose micro-batches hold every
    other row plus padding rows. One step equals the per-example reference that runs the teacher
    on each example (float64), at ZeRO 3 per layer and ZeRO 0 flat."""
    distill = {"alpha": 0.6, "temperature": 2.0, "hidden_weight": 0.0, "layer_map": None, "sharded": sharded,
               "table": True}
    _dpkd_step_against_the_reference(tmp_path, stage=stage, clipping=clipping, distill=distill)


def _teacher_and_examples():
    from tests.pipeline.dataset_pass_worker import examples

    teacher = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), num_labels=2, seed=7).double().eval()
    return teacher, examples(7, teacher.config.vocab_size)


def _one_at_a_time(model, data) -> torch.Tensor:
    """The independent reference: each example alone, unpadded."""
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits for e in data])


def test_a_table_of_teacher_logits_gives_each_sample_its_own_row():
    """DistillationLoss with the phase's table of teacher logits (looked up by example_index) equals
    the loss that runs the teacher on the micro-batch, for rows in any order with padding rows; an
    index that does not follow the rows changes the losses (so the comparison has teeth)."""
    from dist_dpc.compress.distill import DistillationLoss
    from dist_dpc.data import collate

    teacher, data = _teacher_and_examples()
    student = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), num_labels=2, seed=8).double()
    table = _one_at_a_time(teacher, data)
    rows = [5, 2, 6]
    batch = collate([data[i] for i in rows], 0, num_rows=5)
    batch["example_index"] = torch.tensor(rows + [0, 0])
    looked_up = DistillationLoss(teacher, alpha=0.6, temperature=2.0, teacher_logits=table)(student, batch)
    run = DistillationLoss(teacher, alpha=0.6, temperature=2.0)(student, batch)
    torch.testing.assert_close(looked_up[:3], run[:3], rtol=1e-9, atol=1e-12)
    shuffled = dict(batch, example_index=torch.tensor([2, 6, 5, 0, 0]))
    wrong = DistillationLoss(teacher, alpha=0.6, temperature=2.0, teacher_logits=table)(student, shuffled)
    assert (wrong[:3] - run[:3]).abs().max() > 1e-6  # a random tiny teacher: rows differ by ~1e-4

    with pytest.raises(ValueError, match="example_index"):
        DistillationLoss(teacher, alpha=0.6, temperature=2.0, teacher_logits=table)(
            student, {k: v for k, v in batch.items() if k != "example_index"})
    # alpha 0 without a hidden term: the student's cross-entropy, the teacher never run nor kept.
    class Refuses(torch.nn.Module):
        def forward(self, **_):
            raise AssertionError("the teacher ran with alpha 0")

    plain = DistillationLoss(Refuses(), alpha=0.0, temperature=2.0)
    assert plain.teacher is None
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    ce = torch.nn.functional.cross_entropy(student(**inputs).logits.float(), batch["labels"], reduction="none")
    torch.testing.assert_close(plain(student, batch), ce)
    # With the hidden-state term the teacher runs anyway: the table is not used.
    assert DistillationLoss(teacher, alpha=0.6, temperature=2.0, hidden_weight=0.1, layer_map=[0],
                            teacher_logits=table).teacher_logits is None


@pytest.mark.timeout(300)
def test_one_pass_over_the_data_on_two_ranks_is_in_dataset_order(tmp_path):
    """dataset_pass.per_example_outputs on 2 real ranks with uneven shares (4 and 3 rows, passes of
    3) returns every example's teacher logits in dataset order: against the teacher run on each
    example alone in this process."""
    from tests.engine.launch import torchrun

    teacher, data = _teacher_and_examples()
    torchrun("tests/pipeline/dataset_pass_worker.py", [str(tmp_path / "logits.pt")], world_size=2, timeout=240)
    got = torch.load(tmp_path / "logits.pt", weights_only=True)
    torch.testing.assert_close(got.double(), _one_at_a_time(teacher, data), rtol=1e-4, atol=1e-5)


def test_the_trainers_micro_batch_carries_each_samples_row():
    from dist_dpc.data import collate
    from dist_dpc.pipeline.trainer import micro_batch
    from tests.pipeline.dataset_pass_worker import toy_context

    _, data = _teacher_and_examples()
    ctx = toy_context(data, micro_batch_size=4, max_length=8)
    batch = micro_batch(ctx, [4, 1, 3], 0)
    assert batch["example_index"].tolist() == [4, 1, 3, 0] and batch["sample_mask"].tolist() == [1, 1, 1, 0]
    torch.testing.assert_close(batch["input_ids"], collate([data[i] for i in [4, 1, 3]], 0, num_rows=4)["input_ids"])


def test_one_examples_row_of_the_pass_does_not_depend_on_the_other_examples():
    """The pass pads every batch to data.max_length: replacing one example by a longer one leaves
    every other example's teacher logits bit for bit the same. (Padded to each batch's longest, the
    other rows of its batch would change in their last bits with the new length.)"""
    from dist_dpc.engine import init_distributed
    from dist_dpc.pipeline.dataset_pass import teacher_logits
    from tests.pipeline.dataset_pass_worker import toy_context

    teacher, data = _teacher_and_examples()
    teacher = teacher.float()
    world = init_distributed()

    def ctx_for(examples):
        return toy_context(examples, micro_batch_size=4, max_length=24, world=world)

    longer = dict(data[2], input_ids=list(range(5, 25)), attention_mask=[1] * 20)
    before = teacher_logits(ctx_for(data), teacher)
    after = teacher_logits(ctx_for(data[:2] + [longer] + data[3:]), teacher)
    others = [i for i in range(len(data)) if i != 2]
    assert torch.equal(before[others], after[others])
    assert not torch.equal(before[2], after[2])


def test_kd_loss_leaves_out_a_term_of_weight_zero():
    """alpha 0 is the student's cross-entropy and alpha 1 the soft term alone, even where the other
    term is infinite (0 * inf would make the loss NaN)."""
    from dist_dpc.compress.distill import kd_loss

    student = torch.tensor([[2.0, -float("inf"), 0.5]])
    teacher = torch.tensor([[0.0, 1.0, 0.0]])  # puts mass on the class the student rules out: KL = inf
    ce = torch.nn.functional.cross_entropy(student, torch.tensor([0]), reduction="none")
    assert torch.isfinite(ce).all()
    torch.testing.assert_close(kd_loss(student, teacher, torch.tensor([0]), 0.0, 2.0), ce)
    assert torch.isinf(kd_loss(student, teacher, torch.tensor([0]), 0.5, 2.0)).all()
    finite = torch.tensor([[2.0, 0.1, 0.5]])
    only_kl = kd_loss(finite, teacher, torch.tensor([1]), 1.0, 2.0)
    mixed = kd_loss(finite, teacher, torch.tensor([1]), 0.5, 2.0)
    ce_f = torch.nn.functional.cross_entropy(finite, torch.tensor([1]), reduction="none")
    torch.testing.assert_close(mixed, 0.5 * ce_f + 0.5 * only_kl)
