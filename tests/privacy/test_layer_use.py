"""Rules are registered by layer type, but the DP guarantee depends on how a layer is *used*: a layer
run twice per pass, a subclass, or a weight read outside its module's forward is refused."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from dist_dpc.privacy import (BypassedLayerError, ClipMode, DetachedLayerError, PerSampleClipper, ReusedLayerError,
                              UnsupportedLayerError, check_no_bypass, register_dp_layer)
from dist_dpc.privacy.clipper import _REGISTRY
from dist_dpc.privacy.layers.linear import dp_linear
from tests.layer_use_models import (WIDTH, AttentionOutProj, ParentReadsChild, SharedAcrossDepth, TwiceCalledLinear,
                                    misuse_batch, misuse_loss, tiny_albert)
from tests.reference import per_example_grads


def run_pass(model, clipper, mode: ClipMode, batch: dict) -> None:
    with clipper.pass_mode(mode, batch["labels"].shape[0]):
        loss = misuse_loss(model, batch).sum()
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)


@pytest.mark.parametrize("mode", [ClipMode.PER_LAYER, ClipMode.NORMS])
@pytest.mark.parametrize("build, reused", [
    (TwiceCalledLinear, "shared (torch.nn.modules.linear.Linear)"),
    (SharedAcrossDepth, "block.0 (torch.nn.modules.linear.Linear)"),
    (tiny_albert, "albert.encoder.albert_layer_groups.0.albert_layers.0.attention.query (torch.nn"),
])
def test_layer_run_twice_in_one_pass_refused(build, reused, mode):
    model = build()
    clipper = PerSampleClipper(model, 1.0).attach()
    with pytest.raises(ReusedLayerError) as info:
        run_pass(model, clipper, mode, misuse_batch())
    assert reused in str(info.value)
    assert "its own module" in str(info.value) and "requires_grad=False" in str(info.value)
    assert clipper.mode is ClipMode.OFF
    # Refused in the forward: no backward ran, so no norms were recorded either.
    assert clipper.sq_norms is None


def test_each_pass_counts_afresh_and_off_mode_is_free():
    model = nn.Sequential(nn.Embedding(12, WIDTH), nn.Linear(WIDTH, 2))
    clipper = PerSampleClipper(model, 1.0).attach()
    ids = misuse_batch()["input_ids"]
    for _ in range(2):
        with clipper.pass_mode(ClipMode.PER_LAYER, 4):
            model(ids).sum().backward()
    model(ids)
    model(ids)  # OFF (flat's re-weighted pass, evaluation): the class forward, not counted


class UntiedTwice(nn.Module):
    """TwiceCalledLinear with its two calls given their own modules (same weights)."""

    def __init__(self, tied: TwiceCalledLinear):
        super().__init__()
        self.embed, self.head = tied.embed, tied.head
        self.first, self.second = copy.deepcopy(tied.shared), copy.deepcopy(tied.shared)

    def forward(self, input_ids):
        return self.head(self.second(torch.tanh(self.first(self.embed(input_ids)))).mean(1))


def test_why_per_call_clipping_breaks_the_bound():
    """A sample's gradient of a twice-run layer is the sum of the two calls' shares; clipping each
    share to C_l bounds the sum only by 2 C_l, and for real data it does exceed C_l."""
    tied = TwiceCalledLinear().double()
    untied = UntiedTwice(tied)
    batch = misuse_batch(batch_size=6)
    tied_grads = per_example_grads(tied, batch, misuse_loss)
    shares = per_example_grads(untied, batch, misuse_loss)
    threshold = 1e-3  # every share is clipped
    over = []
    for whole, share in zip(tied_grads, shares):
        torch.testing.assert_close(whole["shared.weight"], share["first.weight"] + share["second.weight"])
        clipped = [share[f"{m}.{p}"] * min(1.0, threshold / math.sqrt(sum(float(share[f"{m}.{q}"].pow(2).sum())
                                                                         for q in ("weight", "bias"))))
                   for m in ("first", "second") for p in ("weight", "bias")]
        contribution = math.sqrt(float((clipped[0] + clipped[2]).pow(2).sum() + (clipped[1] + clipped[3]).pow(2).sum()))
        over.append(contribution > threshold * 1.01)
    assert any(over)


def test_subclass_needs_an_explicit_rule():
    """NonDynamicallyQuantizableLinear (nn.MultiheadAttention.out_proj) is a Linear subclass whose
    weight its parent reads directly: exact-type rules refuse it, naming the reason."""
    attention = nn.MultiheadAttention(WIDTH, 2)
    attention.in_proj_weight.requires_grad_(False)
    attention.in_proj_bias.requires_grad_(False)
    with pytest.raises(UnsupportedLayerError, match=r"out_proj \(torch.nn.modules.linear.NonDynamicallyQuantizableLinear"
                                                    r"\), a subclass of Linear: rules cover exact types"):
        PerSampleClipper(attention, 1.0)


def test_subclasses_opt_in():
    class ScaledLinear(nn.Linear):
        pass

    class MyLinear(nn.Linear):
        pass

    with pytest.raises(UnsupportedLayerError, match="a subclass of Linear"):
        PerSampleClipper(nn.Sequential(MyLinear(3, 3)), 1.0)
    register_dp_layer(MyLinear, subclasses=True)(dp_linear)
    try:
        class Deeper(MyLinear):
            pass

        assert len(PerSampleClipper(nn.Sequential(MyLinear(3, 3), Deeper(3, 3)), 1.0).layers) == 2
        with pytest.raises(UnsupportedLayerError):  # nn.Linear's own rule still does not opt in
            PerSampleClipper(nn.Sequential(ScaledLinear(3, 3)), 1.0)
    finally:
        _REGISTRY.pop(f"{MyLinear.__module__}.{MyLinear.__qualname__}")


@pytest.mark.parametrize("build, names", [
    (AttentionOutProj, "attention.out_proj.weight, attention.out_proj.bias"),
    (ParentReadsChild, "child.weight, child.bias"),
])
def test_weights_read_outside_their_module_refused_by_name(build, names):
    model = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    clipper = PerSampleClipper(model, 1.0).attach()
    batch = misuse_batch()
    with pytest.raises(BypassedLayerError) as info:
        check_no_bypass(clipper, model, lambda: misuse_loss(model, batch).sum(), 4)
    assert f": {names}. " in str(info.value) and "requires_grad=False" in str(info.value)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_self_test_passes_for_models_that_use_their_layers():
    model = nn.Sequential(nn.Embedding(12, WIDTH), nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 2))
    model[0].weight.requires_grad_(False)
    clipper = PerSampleClipper(model, 1.0).attach()
    batch = misuse_batch()
    check_no_bypass(clipper, model, lambda: model(batch["input_ids"]).sum(), 4)
    assert all(p.grad is None for p in model.parameters())
    assert all(not layer.methods for layer in clipper.layers)  # the self-test is not in the report


@pytest.mark.parametrize("rewrite", ["deleted", "wrapped"])
def test_forward_rewritten_after_attach_refused_at_the_next_pass(rewrite):
    # What transformers' hub-kernel kernelize does on model.train()/eval() (pops module.forward, or
    # sets its kernel's), or a user's wrapper: the layer would run its plain forward, unclipped, long
    # after the start-up self-test. Every DP pass checks that the DP forwards are still in place.
    model = nn.Sequential(nn.Embedding(12, WIDTH), nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 2))
    model[0].weight.requires_grad_(False)
    clipper = PerSampleClipper(model, 1.0).attach()
    ids = misuse_batch()["input_ids"]
    with clipper.pass_mode(ClipMode.PER_LAYER, 4):
        model(ids).sum().backward()
    if rewrite == "deleted":
        model[1].__dict__.pop("forward")
    else:
        plain = type(model[1]).forward.__get__(model[1])
        model[1].forward = lambda x: plain(x)
    for mode in (ClipMode.PER_LAYER, ClipMode.NORMS):
        with pytest.raises(DetachedLayerError) as info:
            with clipper.pass_mode(mode, 4):
                pass
        assert "(1)" in str(info.value) and "use_kernels=False" in str(info.value)
    with pytest.raises(BypassedLayerError):  # the self-test refuses it too (same error family)
        check_no_bypass(clipper, model, lambda: model(ids).sum(), 4)
    clipper.attach()  # re-attaching restores it
    with clipper.pass_mode(ClipMode.PER_LAYER, 4):
        model(ids).sum().backward()


def test_a_wrapper_that_copies_the_dp_forwards_attributes_is_refused():
    # accelerate's hooks wrap with functools.update_wrapper, which copies the wrapped object's
    # __dict__ (its .clipper included) onto a wrapper that may end up calling the plain forward.
    import functools

    model = nn.Sequential(nn.Embedding(12, WIDTH), nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 2))
    model[0].weight.requires_grad_(False)
    clipper = PerSampleClipper(model, 1.0).attach()
    plain = type(model[1]).forward.__get__(model[1])
    model[1].forward = functools.update_wrapper(functools.partial(lambda x: plain(x)), model[1].forward)
    assert model[1].forward.clipper is clipper  # it looks like ours
    with pytest.raises(DetachedLayerError, match=r"of 1 module\(s\) \(1\)"):
        with clipper.pass_mode(ClipMode.PER_LAYER, 4):
            pass


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 2)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_a_parent_forward_rewritten_after_attach_is_refused():
    # A fused kernel or wrapper on a parent that reads its children's weights directly: the DP
    # forwards of the children never run, and the self-test ran long before.
    model = nn.Sequential(nn.Embedding(12, WIDTH), Block())
    model[0].weight.requires_grad_(False)
    clipper = PerSampleClipper(model, 1.0).attach()
    ids = misuse_batch()["input_ids"]
    check_no_bypass(clipper, model, lambda: model(ids).sum(), 4)
    block = model[1]
    block.forward = lambda x: nn.functional.linear(torch.relu(nn.functional.linear(x, block.up.weight, block.up.bias)),
                                                   block.down.weight, block.down.bias)
    with pytest.raises(DetachedLayerError, match="module\\(s\\) \\(1\\)"):
        with clipper.pass_mode(ClipMode.PER_LAYER, 4):
            pass
    del block.forward
    Block.forward, original = (lambda self, x: self.down(self.up(x))), Block.forward  # a class-level patch
    try:
        with pytest.raises(DetachedLayerError):
            with clipper.pass_mode(ClipMode.PER_LAYER, 4):
                pass
    finally:
        Block.forward = original
    with clipper.pass_mode(ClipMode.PER_LAYER, 4):  # restored: runs
        model(ids).sum().backward()
