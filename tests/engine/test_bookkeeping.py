"""Flat clipping in one forward and one backward (book-keeping).

The clipper's BOOKKEEP pass against explicit per-example gradients (float64), for BERT-, GPT-2- and
Llama-style layers (Linear, Conv1D, Embedding, LayerNorm, RMSNorm); and the engine at ZeRO 0-2 runs
one forward per micro-batch for flat clipping at every ZeRO stage. The engine's
update against the per-example reference at every stage and world is tests/engine/test_equivalence.py.
"""

from __future__ import annotations

import pytest
import torch

from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
from dist_dpc.engine.losses import sequence_classification_loss
from dist_dpc.models import ModelConfig, load_causal_lm, load_sequence_classifier
from dist_dpc.privacy import AlteredHandOverError, PrivacyConfig, ReusedLayerError
from dist_dpc.privacy.clipper import ClipMode, PerSampleClipper
from dist_dpc.privacy.randomness import SecretKey
from tests.engine.dp_worker import lm_batch, logical_batch
from tests.reference import classifier_loss, clipped_sum, lm_loss, per_example_grads

MAX_GRAD_NORM = 0.05  # most samples clipped


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_bookkeeping_pass_equals_per_example_flat_clipping(name):
    causal = name != "tiny-bert"
    config = ModelConfig(name=name, dropout=0.0)
    model = (load_causal_lm(config, seed=2) if causal else load_sequence_classifier(config, num_labels=2, seed=2)).double()
    batch = lm_batch(model.config.vocab_size, 5, 8, 4) if causal else logical_batch(model.config.vocab_size, 5, 8, 4)
    loss = lm_loss if causal else classifier_loss
    expected = clipped_sum(model, per_example_grads(model, batch, loss), MAX_GRAD_NORM, "flat")

    clipper = PerSampleClipper(model, MAX_GRAD_NORM).attach()
    trainable = [p for p in model.parameters() if p.requires_grad]
    seen = {}

    def norms_pass(model_forward):
        grads = torch.autograd.grad(loss(model_forward, batch).sum(), trainable, allow_unused=True)
        assert all(g is None for g in grads), "the book-keeping backward returns no weight gradient"
        seen["factors"] = clipper.flat_factors(clipper.sq_norms)
        seen["calls"] = []
        seen["hooks"] = [layer.module.register_forward_pre_hook(lambda m, args: seen["calls"].append(m))
                         for layer in clipper.layers]
        return seen["factors"]

    with clipper.pass_mode(ClipMode.BOOKKEEP, 5):
        handed = clipper.flat_pass(norms_pass)
    for hook in seen["hooks"]:
        hook.remove()
    factors = seen["factors"]
    assert clipper._deferred == [] and clipper._handing == {}, "what the pass kept is handed over"
    assert "forward" not in model.__dict__, "the model's forward is its own again"
    assert sorted(map(id, seen["calls"])) == sorted(id(layer.module) for layer in clipper.layers), \
        "each layer's sums enter through one call of its own module (where ZeRO 3's hooks gather its weights)"
    assert all(p.grad is None for p in trainable), "nothing is computed before the hand-over's backward"
    (handed * 3.0).backward()  # an incoming gradient other than 1 (a loss scale) ...
    assert bool((factors < 1).any()), "some samples are clipped, so the test can tell flat from unclipped"
    for n, p in model.named_parameters():  # ... never multiplies the sums
        assert torch.allclose(p.grad, expected[n], rtol=1e-9, atol=1e-12), n
    with pytest.raises(AlteredHandOverError, match="were scaled"):  # and the step is refused
        clipper.check_handed_over()


def test_flat_pass_only_in_a_bookkeeping_pass():
    model = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), num_labels=2, seed=0)
    clipper = PerSampleClipper(model, 1.0).attach()
    with pytest.raises(RuntimeError, match="BOOKKEEP"):
        clipper.flat_pass(lambda forward: torch.ones(2))


@pytest.fixture(scope="module")
def world():
    return init_distributed()


@pytest.mark.parametrize("stage, passes", [(0, 1), (1, 1), (2, 1), (3, 1)])
def test_flat_forward_passes_per_micro_batch(world, stage, passes):
    """Forwards of the model on data (the hand-over runs each layer once more on a 0-d token)."""
    model = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), num_labels=2, seed=1)
    ds = build_ds_config({"zero_optimization": {"stage3_param_persistence_threshold": 0}}, micro_batch_size=4,
                         world_size=1, zero_stage=stage, lr=0.1, weight_decay=0.0, optimizer="sgd", bf16=False)
    privacy = PrivacyConfig(target_epsilon=None, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-4, clipping="flat")
    engine = DPEngine(model, ds, privacy, dataset_size=1000, expected_batch_size=8, planned_steps=3,
                      loss_fn=sequence_classification_loss, world=world, key=SecretKey.from_seed(0))
    forwards = []
    embedding = engine.module.get_input_embeddings()
    embedding.register_forward_pre_hook(lambda module, args: forwards.append(1) if args[0].dim() > 0 else None)
    micro = [{**logical_batch(model.config.vocab_size, 4, 6, s), "sample_mask": torch.ones(4)} for s in (1, 2)]
    engine.train_step(micro, logical_batch_size=8)  # the first step also runs the bypass self-test
    forwards.clear()
    engine.train_step(micro, logical_batch_size=8)
    assert len(forwards) == passes * len(micro)


def _loss_with_its_own_backward(forward, batch):
    """A loss_fn that computes a gradient itself (a logged diagnostic): in the one-backward pass every
    layer on its path would keep a second clipped sum, and a sample would count sqrt(2) C."""
    per_sample = torch.nn.functional.cross_entropy(forward(batch["x"]), batch["y"], reduction="none")
    torch.autograd.grad(per_sample.sum(), [p for p in forward.parameters() if p.requires_grad], retain_graph=True,
                        allow_unused=True)
    return per_sample


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_layer_backward_twice_in_one_pass_is_refused(world, stage):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    ds = build_ds_config({}, micro_batch_size=1, world_size=1, zero_stage=stage, lr=1.0, weight_decay=0.0,
                         optimizer="sgd", bf16=False)
    privacy = PrivacyConfig(target_epsilon=None, noise_multiplier=0.0, max_grad_norm=1.0, delta=1e-4, clipping="flat")
    engine = DPEngine(model, ds, privacy, dataset_size=1000, expected_batch_size=1, planned_steps=1,
                      loss_fn=_loss_with_its_own_backward, world=world, key=SecretKey.from_seed(0))
    before = [p.detach().clone() for p in engine.module.parameters()]
    batch = {"x": torch.randn(1, 4) * 10, "y": torch.tensor([2]), "sample_mask": torch.ones(1)}
    with pytest.raises(ReusedLayerError, match="backward ran twice in one flat-clipping pass"):
        engine.train_step([batch], 1)
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    assert engine.steps_done == 0 and engine.accountant.steps == 0


@pytest.mark.parametrize("stage", [2, 3])
def test_flat_with_wall_clock_breakdown_and_bf16(world, stage):
    """flat runs inside DeepSpeed's forward now, so its timers work; bf16 is accepted (the factors keep
    a rounding margin, tests/privacy/test_bf16_clipping.py)."""
    model = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), num_labels=2, seed=1)
    ds = build_ds_config({"wall_clock_breakdown": True}, micro_batch_size=4, world_size=1, zero_stage=stage, lr=0.1,
                         weight_decay=0.0, optimizer="sgd", bf16=True)
    flat = PrivacyConfig(target_epsilon=None, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-4, clipping="flat")
    DPEngine.check_settings(model, ds, flat)
    engine = DPEngine(model, ds, flat, dataset_size=1000, expected_batch_size=8, planned_steps=2,
                      loss_fn=sequence_classification_loss, world=world, key=SecretKey.from_seed(0))
    micro = [{**logical_batch(model.config.vocab_size, 4, 6, s), "sample_mask": torch.ones(4)} for s in (1, 2)]
    for _ in range(2):
        stats = engine.train_step(micro, logical_batch_size=8)
    assert engine.steps_done == 2 and stats.grad_norm_quantiles["p50"] > 0


class _TwoLinear(torch.nn.Module):
    def __init__(self, frozen_weight: bool = False):
        super().__init__()
        self.a, self.b = torch.nn.Linear(5, 6), torch.nn.Linear(6, 2)
        self.a.weight.requires_grad_(not frozen_weight)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _xy_loss(forward, batch):
    return torch.nn.functional.cross_entropy(forward(batch["x"]), batch["y"], reduction="none")


def _flat_engine(world, model, stage, max_grad_norm=0.05):
    ds = build_ds_config({"optimizer": {"type": "SGD", "params": {"lr": 1.0}},
                          "zero_optimization": {"stage3_param_persistence_threshold": 0}}, micro_batch_size=4,
                         world_size=1, zero_stage=stage, lr=1.0, weight_decay=0.0, optimizer="sgd", bf16=False)
    privacy = PrivacyConfig(target_epsilon=None, noise_multiplier=0.0, max_grad_norm=max_grad_norm, delta=1e-4,
                            clipping="flat")
    return DPEngine(model, ds, privacy, dataset_size=1000, expected_batch_size=8, planned_steps=3, loss_fn=_xy_loss,
                    world=world, key=SecretKey.from_seed(0))


def _full(engine):
    if engine.ds.zero_optimization_stage() == 3:
        return {n: p.ds_tensor.detach().clone().view(p.ds_shape) for n, p in engine.module.named_parameters()}
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _xy_micro(seed):
    g = torch.Generator().manual_seed(seed)
    return [{"x": 3 * torch.randn(4, 5, generator=g), "y": torch.randint(0, 2, (4,), generator=g),
             "sample_mask": torch.tensor([1.0, 1.0, 1.0, 1.0] if j == 0 else [1.0, 1.0, 1.0, 0.0])} for j in range(2)]


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("kind", ["root is a DP layer", "frozen weight"])
def test_flat_engine_update_on_small_models(world, stage, kind):
    """The root itself a DP layer (its hand-over goes through its own DP forward inside the root call),
    and a frozen weight beside a trainable bias: two micro-batches (one padding row), two steps, against
    per-example flat clipping in float64."""
    import copy
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2) if kind == "root is a DP layer" else _TwoLinear(frozen_weight=True)
    pristine = copy.deepcopy(model).double()
    engine = _flat_engine(world, model, stage)
    for step in range(2):
        micro = _xy_micro(step)
        before = _full(engine)
        with torch.no_grad():
            for n, p in pristine.named_parameters():
                p.copy_(before[n])
        rows = [{"x": m["x"][i:i + 1].double(), "y": m["y"][i:i + 1]} for m in micro for i in range(4) if m["sample_mask"][i]]
        batch = {"x": torch.cat([r["x"] for r in rows]), "y": torch.cat([r["y"] for r in rows])}
        grads = []
        for i in range(len(rows)):
            pristine.zero_grad(set_to_none=True)
            _xy_loss(pristine, {k: v[i:i + 1] for k, v in batch.items()}).sum().backward()
            grads.append({n: p.grad.clone() for n, p in pristine.named_parameters() if p.requires_grad})
        expected = clipped_sum(pristine, grads, 0.05, "flat")
        engine.train_step(micro, logical_batch_size=7)
        after = _full(engine)
        for n, p in pristine.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(after[n].double() - before[n].double(), -expected[n] / 8, rtol=1e-5, atol=1e-7)
            else:
                assert torch.equal(after[n], before[n]), n


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("hook", ["scales a layer", "scales the model", "detaches a layer"])
def test_a_hook_that_alters_the_hand_over_is_refused(world, stage, hook):
    """Forward hooks also run on flat clipping's hand-over call: one that scales an output would scale
    the clipped sums past C, one that detaches it would drop them. The step stops before the update."""
    torch.manual_seed(0)
    model = _TwoLinear()
    if hook == "scales a layer":
        model.b.register_forward_hook(lambda module, args, out: out * 2.0)
    elif hook == "scales the model":
        model.register_forward_hook(lambda module, args, out: out * 2.0)
    else:
        model.a.register_forward_hook(lambda module, args, out: out.detach() if out.dim() == 0 else out)
    engine = _flat_engine(world, model, stage)
    before = _full(engine)
    with pytest.raises(AlteredHandOverError, match="never reached" if hook.startswith("detaches") else "were scaled"):
        engine.train_step(_xy_micro(0), logical_batch_size=7)
    assert all(torch.equal(before[n], p) for n, p in _full(engine).items())
    assert engine.steps_done == 0 and engine.accountant.steps == 0 and engine.broken


def test_a_rule_without_bookkeeping_is_refused(world):
    """A third-party layer rule that returns its weight gradient in the book-keeping pass would have
    that gradient dropped: refused instead."""
    from dist_dpc.privacy import BypassedLayerError
    engine = _flat_engine(world, _TwoLinear(), 0)
    real = engine.clipper.flat_pass

    def leaky(norms_pass, call_model=None):
        def with_a_weight_gradient(forward):
            engine.clipper.mode = ClipMode.PER_LAYER  # the layers return clipped weight gradients
            try:
                return norms_pass(forward)
            finally:
                engine.clipper.mode = ClipMode.BOOKKEEP
        return real(with_a_weight_gradient, call_model)

    engine.clipper.flat_pass = leaky
    with pytest.raises(BypassedLayerError, match="does not implement ClipMode.BOOKKEEP"):
        engine.train_step(_xy_micro(0), logical_batch_size=7)


def test_loss_fn_may_call_forward_forward():
    """The model stand-in given to loss_fn in the flat pass: its .forward is the model's, not the
    temporary one (which would recurse)."""
    torch.manual_seed(0)
    model = _TwoLinear()
    clipper = PerSampleClipper(model, 1.0).attach()
    trainable = [p for p in model.parameters()]
    x, y = torch.randn(3, 5), torch.tensor([0, 1, 0])

    def norms_pass(forward):
        assert forward.a is model.a  # attributes are the model's
        loss = torch.nn.functional.cross_entropy(forward.forward(x), y, reduction="none")
        torch.autograd.grad(loss.sum(), trainable, allow_unused=True)
        return clipper.flat_factors(clipper.sq_norms)

    with clipper.pass_mode(ClipMode.BOOKKEEP, 3):
        clipper.flat_pass(norms_pass).backward()
    clipper.check_handed_over()
    assert all(p.grad is not None for p in trainable)
