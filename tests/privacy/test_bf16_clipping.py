"""bf16: clip factors and clipped sums are computed in float32 with a margin, so that after the final
cast to bf16 no sample's clipped gradient exceeds its threshold: C_l per layer (per_layer), C for the
whole gradient (flat, book-keeping)."""

from __future__ import annotations

import pytest
import torch

from dist_dpc.models import ModelConfig, load_sequence_classifier
from dist_dpc.privacy import ClipMode, PerSampleClipper
from dist_dpc.privacy import clipper as clipper_module
from tests.privacy.test_clipper import make_batch
from tests.reference import classifier_loss


def worst_ratio(name: str, max_grad_norm: float) -> float:
    """max over samples and layers of ||clipped bf16 gradient of the layer|| / C_l, each sample run
    alone (a batch of one: its clipped sum is its contribution, with nothing to hide rounding in)."""
    model = load_sequence_classifier(ModelConfig(name=name, dropout=0.0), num_labels=2, seed=1).to(torch.bfloat16)
    clipper = PerSampleClipper(model, max_grad_norm).attach()
    batch = make_batch(model.config.vocab_size, batch=6, length=7, pair=(name == "tiny-bert"))
    worst = 0.0
    for i in range(6):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        with clipper.pass_mode(ClipMode.PER_LAYER, 1):
            classifier_loss(model, one).sum().backward()
        for layer in clipper.layers:
            grads = [p.grad for p in layer.module.parameters(recurse=False) if p.requires_grad and p.grad is not None]
            assert all(g.dtype == torch.bfloat16 for g in grads)
            norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads))
            worst = max(worst, float(norm) / clipper.layer_threshold)
    clipper.detach()
    return worst


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_bf16_per_sample_contribution_within_threshold(name):
    ratio = worst_ratio(name, max_grad_norm=1e-2)  # every layer of every sample is clipped
    assert ratio <= 1.0, ratio
    assert ratio > 1 - 2 ** -5  # clipped to just under C_l, not far below it


def worst_flat_ratio(name: str, max_grad_norm: float) -> float:
    """max over samples of ||clipped bf16 gradient of the whole model|| / C, flat clipping's one-backward
    pass, each sample alone."""
    model = load_sequence_classifier(ModelConfig(name=name, dropout=0.0), num_labels=2, seed=1).to(torch.bfloat16)
    clipper = PerSampleClipper(model, max_grad_norm).attach()
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = make_batch(model.config.vocab_size, batch=6, length=7, pair=(name == "tiny-bert"))
    worst = 0.0
    for i in range(6):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        model.zero_grad(set_to_none=True)

        def norms_pass(forward):
            torch.autograd.grad(classifier_loss(forward, one).sum(), trainable, allow_unused=True)
            return clipper.flat_factors(clipper.sq_norms)

        with clipper.pass_mode(ClipMode.BOOKKEEP, 1):
            clipper.flat_pass(norms_pass).backward()
        assert all(p.grad.dtype == torch.bfloat16 for p in trainable)
        norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in trainable))
        worst = max(worst, float(norm) / max_grad_norm)
    clipper.detach()
    return worst


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_bf16_flat_contribution_within_threshold(name):
    ratio = worst_flat_ratio(name, max_grad_norm=1e-3)  # every sample is clipped
    assert ratio <= 1.0, ratio
    assert ratio > 1 - 2 ** -5  # clipped to just under C, not far below it


def test_bf16_margin_is_needed(monkeypatch):
    """Without the margin the cast alone lifts some contributions above C_l: the margin is not idle."""
    monkeypatch.setattr(clipper_module, "_rounding_margin", lambda dtype: 0.0)
    assert worst_ratio("tiny-bert", max_grad_norm=1e-2) > 1.0
    assert max(worst_flat_ratio(name, max_grad_norm=1e-3) for name in ("tiny-bert", "tiny-gpt2", "tiny-llama")) > 1.0
