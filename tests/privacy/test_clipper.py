"""Per-sample clipping in one backward equals explicit per-example gradients, clipped and summed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_dpc.models import ModelConfig, load_sequence_classifier
from dist_dpc.privacy import ClipMode, PerSampleClipper, TiedWeightsError, UnsupportedLayerError
from tests.reference import classifier_loss, clipped_sum, per_example_grads


def make_batch(vocab: int, batch: int = 5, length: int = 7, pair: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0  # a padded row
    ids[1, 4:] = 0
    ids[2, 3] = ids[2, 5]  # a repeated token: embedding cross terms
    out = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,), generator=gen)}
    if pair:
        out["token_type_ids"] = (torch.arange(length) >= 4).long().expand(batch, length).clone()
    return out


def assert_grads_close(got: dict, reference: dict, rel: float = 1e-6) -> None:
    """Relative error per tensor; tensors that are ~0 in exact arithmetic (attention key bias) are
    measured against the whole gradient's scale instead of their own."""
    scale = torch.sqrt(sum(r.pow(2).sum() for r in reference.values()))
    for n, ref in reference.items():
        assert got[n] is not None, n
        err = (got[n] - ref).norm() / torch.maximum(ref.norm(), 1e-3 * scale)
        assert err < rel, (n, float(err))


def tiny(name: str):
    model = load_sequence_classifier(ModelConfig(name=name, dropout=0.0), num_labels=2, tokenizer=None, seed=1)
    return model.double()


def dp_grads(model, batch, clipping: str, max_grad_norm: float):
    clipper = PerSampleClipper(model, max_grad_norm).attach()
    size = batch["labels"].shape[0]
    model.zero_grad(set_to_none=True)
    if clipping == "per_layer":
        with clipper.pass_mode(ClipMode.PER_LAYER, size):
            classifier_loss(model, batch).sum().backward()
    else:
        with clipper.pass_mode(ClipMode.NORMS, size):
            loss = classifier_loss(model, batch).sum()
            sink = [p for p in model.parameters() if p.requires_grad]
            torch.autograd.grad(loss, sink, allow_unused=True)
            factors = clipper.flat_factors(clipper.sq_norms)
        (factors.detach() * classifier_loss(model, batch)).sum().backward()
    clipper.detach()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, clipper


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("clipping", ["per_layer", "flat"])
@pytest.mark.parametrize("max_grad_norm", [1e-2, 1e3])
def test_matches_per_example_reference(name, clipping, max_grad_norm):
    model = tiny(name)
    batch = make_batch(model.config.vocab_size, pair=(name == "tiny-bert"))
    reference = clipped_sum(model, per_example_grads(model, batch), max_grad_norm, clipping)
    got, clipper = dp_grads(model, batch, clipping, max_grad_norm)
    assert_grads_close(got, reference)
    if max_grad_norm == 1e-2:
        assert bool(clipper.clipped.all())  # tiny threshold: every sample clipped
    else:
        assert not bool(clipper.clipped.any())


def test_norm_pass_leaves_no_gradients_and_sums_every_layer():
    model = tiny("tiny-bert")
    batch = make_batch(model.config.vocab_size)
    grads = per_example_grads(model, batch)
    clipper = PerSampleClipper(model, 1.0).attach()
    with clipper.pass_mode(ClipMode.NORMS, 5):
        loss = classifier_loss(model, batch).sum()
        torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
    assert all(p.grad is None for p in model.parameters())
    expected = torch.tensor([sum(float(t.pow(2).sum()) for t in g.values()) for g in grads], dtype=torch.float64)
    torch.testing.assert_close(clipper.sq_norms, expected, rtol=1e-8, atol=1e-12)
    methods = clipper.method_summary()
    assert methods["classifier"] == {"ghost": 1}  # T = 1: ghost is free


def test_direct_method_chosen_for_long_sequences():
    model = tiny("tiny-bert")
    batch = make_batch(model.config.vocab_size, batch=3, length=60)
    clipper = PerSampleClipper(model, 1.0).attach()
    with clipper.pass_mode(ClipMode.PER_LAYER, 3):
        classifier_loss(model, batch).sum().backward()
    methods = clipper.method_summary()
    # 2 * 60^2 > 32 * 32: the query projection's per-sample gradient is cheaper than its ghost norm.
    assert methods["bert.encoder.layer.0.attention.self.query"] == {"direct": 1}


def test_frozen_layers_skipped():
    model = tiny("tiny-bert")
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    batch = make_batch(model.config.vocab_size)
    reference = clipped_sum(model, per_example_grads(model, batch), 0.05, "per_layer")
    got, clipper = dp_grads(model, batch, "per_layer", 0.05)
    assert not any(layer.name.startswith("bert.embeddings") for layer in clipper.layers)
    assert_grads_close(got, reference)


def test_unsupported_layer_refused_with_names():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1), nn.GroupNorm(2, 4))
    with pytest.raises(UnsupportedLayerError) as info:
        PerSampleClipper(model, 1.0)
    msg = str(info.value)
    assert "1 (torch.nn.modules.conv.Conv1d)" in msg and "2 (torch.nn.modules.normalization.GroupNorm)" in msg
    assert "requires_grad=False" in msg
    model[1].requires_grad_(False)
    model[2].requires_grad_(False)
    PerSampleClipper(model, 1.0)  # frozen unsupported layers are fine


def test_tied_weights_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(TiedWeightsError, match="tie_word_embeddings=False"):
        PerSampleClipper(model, 1.0)


@pytest.mark.parametrize("clipping", ["per_layer", "flat"])
def test_bias_only_training_matches_per_example_reference(clipping):
    """DP-BiTFiT (model.trainable): Linear weights frozen, their biases trained; the clipped sums of
    the trainable tensors equal the per-example reference, and frozen weights get no gradient."""
    model = tiny("tiny-bert")
    for name, p in model.named_parameters():
        p.requires_grad_(("bias" in name or "LayerNorm" in name or "classifier" in name) and "embeddings" not in name)
    batch = make_batch(model.config.vocab_size, pair=True)
    reference = clipped_sum(model, per_example_grads(model, batch), 0.05, clipping)
    got, clipper = dp_grads(model, batch, clipping, 0.05)
    assert set(got) == set(reference) and all("weight" not in n or "LayerNorm" in n or "classifier" in n for n in got)
    assert_grads_close(got, reference)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
