"""One sample can neither poison nor couple the others' clipped gradients: a sample with non-finite
values is dropped (per_layer), batch-mixing modules and layers run on non-batch leading dimensions are
refused, and so is an embedding whose gradient depends on token frequencies in the whole batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dist_dpc.models import ModelConfig, load_sequence_classifier
from dist_dpc.privacy import BatchDimError, BatchMixingLayerError, ClipMode, PerSampleClipper
from dist_dpc.privacy.linear_probe import clip_rows, dp_linear_probe, private_mean
from dist_dpc.privacy.randomness import SecretKey

INF, NAN = float("inf"), float("nan")


class Net(nn.Module):
    """Embedding + Linear + LayerNorm + head; ``scale`` (B,) multiplies a sample's activations (inf: overflow)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 6, padding_idx=0)
        self.lin = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)

    def forward(self, ids, scale):
        h = self.embed(ids) * scale.view(-1, 1, 1)
        return self.head(self.norm(torch.tanh(self.lin(h))).mean(1))


def per_layer_grads(model, ids, scale, weights, max_grad_norm=0.5):
    clipper = PerSampleClipper(model, max_grad_norm).attach()
    model.zero_grad(set_to_none=True)
    with clipper.pass_mode(ClipMode.PER_LAYER, ids.shape[0]):
        (model(ids, scale).sum(1) * weights).sum().backward()
    clipper.detach()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, clipper


@pytest.mark.parametrize("bad", [INF, NAN])
def test_per_layer_drops_a_non_finite_sample(bad):
    torch.manual_seed(0)
    model = Net().double()
    ids = torch.randint(1, 12, (6, 5))
    scale = torch.ones(6, dtype=torch.float64)
    weights = torch.randn(6, dtype=torch.float64)
    poisoned = scale.clone()
    poisoned[3] = bad  # one sample's activations overflow
    got, clipper = per_layer_grads(model, ids, poisoned, weights)
    keep = torch.arange(6) != 3
    ref, _ = per_layer_grads(model, ids[keep], scale[keep], weights[keep])
    for n in ref:
        assert torch.isfinite(got[n]).all(), n
        torch.testing.assert_close(got[n], ref[n], rtol=1e-12, atol=1e-12)
    assert bool(clipper.clipped[3])  # counted as clipped, norms statistic non-finite


def test_clip_factors_of_non_finite_norms_are_zero():
    model = nn.Linear(2, 2)
    clipper = PerSampleClipper(model, 1.0)
    sq = torch.tensor([4.0, NAN, INF, 0.25])
    for factors in (clipper.layer_factors(sq, torch.float32), clipper.layer_factors(sq, torch.bfloat16),
                    clipper.flat_factors(sq)):
        assert factors[1] == 0 and factors[2] == 0 and factors[0] > 0 and factors[3] == 1
        assert clipper.clipped.tolist() == [True, True, True, False]


def test_probe_and_mean_drop_non_finite_examples():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=gen)
    y = torch.randint(0, 3, (20,), generator=gen)
    bad = x.clone()
    bad[5, 2] = INF
    bad[7, 0] = NAN
    clipped, was = clip_rows(bad.double(), 1.0)
    assert torch.isfinite(clipped).all() and clipped[5].abs().sum() == 0 and clipped[7].abs().sum() == 0
    assert bool(was[5]) and bool(was[7])
    key = SecretKey.from_seed(3)
    mean, _ = private_mean(bad, clip_norm=1.0, noise_multiplier=0.0, key=key)
    keep = torch.ones(20, dtype=torch.bool)
    keep[[5, 7]] = False
    ref = clip_rows(x[keep].double(), 1.0)[0].sum(0) / 20
    torch.testing.assert_close(mean.double(), ref, rtol=1e-6, atol=1e-7)
    args = dict(weight=torch.zeros(3, 4), bias=torch.zeros(3), sample_rate=1.0, steps=3, noise_multiplier=0.0,
                max_grad_norm=0.1, lr=0.1, key=key, optimizer="sgd")
    res = dp_linear_probe(bad, y, **args)
    assert torch.isfinite(res.weight).all() and torch.isfinite(res.bias).all()
    # Dropped: plain SGD on the other 18 examples, still divided by the expected size 20.
    ref_w, ref_b = torch.zeros(3, 4), torch.zeros(3)
    xs, ys = x[keep], y[keep]
    for _ in range(3):
        g = torch.softmax(xs @ ref_w.T + ref_b, 1) - torch.nn.functional.one_hot(ys, 3).float()
        norms = g.norm(dim=1) * (xs.pow(2).sum(1) + 1).sqrt()
        g = g * torch.clamp(0.1 / norms, max=1.0).unsqueeze(1)
        ref_w, ref_b = ref_w - 0.1 * (g.T @ xs) / 20, ref_b - 0.1 * g.sum(0) / 20
    torch.testing.assert_close(res.weight, ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.bias, ref_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixer", [
    lambda: nn.BatchNorm1d(4, affine=False),
    lambda: nn.BatchNorm1d(4).requires_grad_(False),
    lambda: nn.SyncBatchNorm(4, affine=False),
    lambda: nn.LazyBatchNorm1d(affine=False),
    lambda: nn.InstanceNorm1d(4, track_running_stats=True),
])
def test_batch_mixing_modules_refused_whatever_they_own(mixer):
    model = nn.Sequential(nn.Linear(4, 4), mixer(), nn.Linear(4, 1))
    with pytest.raises(BatchMixingLayerError, match=r"1 \(torch.nn.modules.*Norm.*LayerNorm or GroupNorm"):
        PerSampleClipper(model, 1.0)


def test_per_sample_norm_without_running_stats_is_fine():
    PerSampleClipper(nn.Sequential(nn.Linear(4, 4), nn.InstanceNorm1d(4), nn.GroupNorm(2, 4).requires_grad_(False)), 1.0)


class Shared(nn.Module):
    """A Linear applied to a (1, T, D) tensor shared by the batch, or to (B*T, D)."""

    def __init__(self, flatten: bool):
        super().__init__()
        self.flatten = flatten
        self.rel = nn.Parameter(torch.randn(1, 3, 4), requires_grad=False)
        self.proj, self.norm, self.out = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1)

    def forward(self, x):  # x (B, T, 4)
        if self.flatten:
            return self.out(self.proj(x.reshape(-1, 4)).view(x.shape)).sum((1, 2))
        return self.out(self.norm(x + self.proj(self.rel))).sum((1, 2))


@pytest.mark.parametrize("flatten, name", [(False, "proj"), (True, "proj")])
@pytest.mark.parametrize("mode", [ClipMode.PER_LAYER, ClipMode.NORMS])
def test_layer_on_non_batch_leading_dim_refused(flatten, name, mode):
    model = Shared(flatten)
    clipper = PerSampleClipper(model, 1.0).attach()
    with clipper.pass_mode(mode, 5), pytest.raises(BatchDimError, match=rf"DP layer {name} .*not the micro-batch size 5"):
        model(torch.randn(5, 3, 4))


def test_norm_on_non_batch_leading_dim_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    clipper = PerSampleClipper(model, 1.0).attach()
    with clipper.pass_mode(ClipMode.PER_LAYER, 5), pytest.raises(BatchDimError, match=r"DP layer 1 \(torch.nn.modules.normalization.LayerNorm\)"):
        model[1](torch.randn(1, 3, 4))  # the norm alone, on a shared tensor
    with clipper.pass_mode(ClipMode.PER_LAYER, 5):
        model(torch.randn(5, 3, 4)).sum().backward()  # the batch first: fine


def test_embedding_leading_dim_checked_after_broadcast():
    emb = nn.Embedding(10, 4)
    clipper = PerSampleClipper(emb, 1.0).attach()
    with clipper.pass_mode(ClipMode.PER_LAYER, 3):
        emb(torch.arange(5).view(1, 5)).sum().backward()  # shared (1, T) position ids: expanded, fine
    with clipper.pass_mode(ClipMode.PER_LAYER, 3), pytest.raises(BatchDimError, match="ids tensor of shape"):
        emb(torch.arange(10).view(2, 5))
    with clipper.pass_mode(ClipMode.PER_LAYER, 3), pytest.raises(BatchDimError, match="ids tensor of shape"):
        emb(torch.arange(5))  # (T,) with no batch dimension


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2", "tiny-llama", "minilm"])
def test_real_models_pass_the_leading_dim_checks(name):
    model = load_sequence_classifier(ModelConfig(name=name, dropout=0.0), num_labels=2, tokenizer=None, seed=1)
    clipper = PerSampleClipper(model, 1.0).attach()
    ids = torch.randint(1, model.config.vocab_size, (3, 6))
    with clipper.pass_mode(ClipMode.PER_LAYER, 3):
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_embedding_scale_grad_by_freq_refused():
    emb = nn.Embedding(10, 4, scale_grad_by_freq=True)
    clipper = PerSampleClipper(emb, 1.0).attach()
    for mode in (ClipMode.PER_LAYER, ClipMode.NORMS):
        with clipper.pass_mode(mode, 2), pytest.raises(ValueError, match="scale_grad_by_freq=True is not supported"):
            emb(torch.tensor([[1, 1], [1, 2]]))
