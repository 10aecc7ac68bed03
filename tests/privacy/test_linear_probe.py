"""The DP mean and the DP linear probe against per-example autograd loops and statistical bounds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_dpc.privacy.linear_probe import dp_linear_probe, logit_gradients, private_mean
from dist_dpc.privacy.randomness import SecretKey


def kd_reference(logits, labels, teacher, alpha, temperature):
    """(1 - alpha) CE + alpha T^2 KL(teacher_T || student_T), written out from the definition."""
    p_t = torch.softmax(teacher / temperature, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(logits / temperature, 1))).sum(1)
    return (1 - alpha) * F.cross_entropy(logits, labels, reduction="none") + alpha * temperature ** 2 * kl


@pytest.mark.parametrize("alpha,temperature", [(0.0, 1.0), (0.5, 2.0), (1.0, 3.0)])
def test_logit_gradients_match_autograd(alpha, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=gen, dtype=torch.double, requires_grad=True)
    teacher = torch.randn(6, 3, generator=gen, dtype=torch.double)
    labels = torch.randint(0, 3, (6,), generator=gen)
    kd_reference(logits, labels, teacher, alpha, temperature).sum().backward()
    got = logit_gradients(logits.detach(), labels, teacher, alpha, temperature)
    torch.testing.assert_close(got, logits.grad, rtol=1e-10, atol=1e-12)


def reference_probe(x, y, w0, b0, teacher, alpha, temperature, clip, lr, steps):
    """Full-batch clipped gradient descent with Adam, one autograd backward per example."""
    layer = torch.nn.Linear(x.shape[1], w0.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(w0)
        layer.bias.copy_(b0)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):
        total = [torch.zeros_like(p) for p in layer.parameters()]
        for i in range(len(x)):
            layer.zero_grad()
            kd_reference(layer(x[i:i + 1]), y[i:i + 1], teacher[i:i + 1], alpha, temperature).sum().backward()
            grads = [p.grad for p in layer.parameters()]
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            factor = min(1.0, clip / float(norm))
            for t, g in zip(total, grads):
                t += g * factor
        for p, t in zip(layer.parameters(), total):
            p.grad = t / len(x)
        opt.step()
    return layer.weight.detach(), layer.bias.detach()


def test_probe_without_noise_equals_per_example_reference():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=gen, dtype=torch.double) * 2
    y = torch.randint(0, 3, (40,), generator=gen)
    teacher = torch.randn(40, 3, generator=gen, dtype=torch.double)
    w0, b0 = torch.randn(3, 5, generator=gen, dtype=torch.double) * 0.1, torch.zeros(3, dtype=torch.double)
    # sample_rate 1: every example in every step, so the Poisson sampler is out of the comparison.
    got = dp_linear_probe(x, y, weight=w0, bias=b0, sample_rate=1.0, steps=4, noise_multiplier=0.0,
                          max_grad_norm=0.5, lr=0.1, key=SecretKey.from_seed(3), teacher_logits=teacher, alpha=0.5,
                          temperature=2.0)
    ref_w, ref_b = reference_probe(x, y, w0, b0, teacher, 0.5, 2.0, 0.5, 0.1, 4)
    assert 0 < got.clipped_fraction < 1  # the clip threshold is active for some examples, not all
    torch.testing.assert_close(got.weight.double(), ref_w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.bias.double(), ref_b, rtol=1e-4, atol=1e-5)


def test_probe_noise_has_the_calibrated_scale():
    # Zero features: the weight's clipped gradient is exactly 0, so after one plain SGD step of lr 1
    # from 0 the weight is -noise / (q N); its entries must be N(0, (sigma C / (q N))^2).
    n, dim, sigma, clip, q = 1000, 500, 1.3, 0.7, 0.2
    x, y = torch.zeros(n, dim), torch.zeros(n, dtype=torch.long)
    result = dp_linear_probe(x, y, weight=torch.zeros(2, dim), bias=torch.zeros(2), sample_rate=q, steps=1,
                             noise_multiplier=sigma, max_grad_norm=clip, lr=1.0, key=SecretKey.from_seed(5),
                             optimizer="sgd")
    draws = (-result.weight * q * n).flatten().double()
    expected = sigma * clip
    # 1000 draws: the sample std is within 10 % of the truth with probability > 0.998.
    assert abs(float(draws.std()) / expected - 1) < 0.1
    assert abs(float(draws.mean())) < 4 * expected / math.sqrt(draws.numel())
    other = dp_linear_probe(x, y, weight=torch.zeros(2, dim), bias=torch.zeros(2), sample_rate=q, steps=1,
                            noise_multiplier=sigma, max_grad_norm=clip, lr=1.0, key=SecretKey.from_seed(6),
                            optimizer="sgd")
    assert not torch.equal(other.weight, result.weight)  # the key drives the noise


def test_private_mean_clips_rows_and_adds_noise_of_the_calibrated_scale():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, 4, generator=gen, dtype=torch.double) * 3
    norms = x.norm(dim=1, keepdim=True)
    reference = (x * torch.clamp(2.0 / norms, max=1.0)).mean(0)
    exact, fraction = private_mean(x, clip_norm=2.0, noise_multiplier=0.0, key=SecretKey.from_seed(0))
    torch.testing.assert_close(exact, reference)
    assert fraction == pytest.approx(float((norms > 2.0).double().mean()))
    # Noise on the sum: N(0, (sigma R)^2) per coordinate, so the mean moves by that / N.
    zeros = torch.zeros(10, 2000, dtype=torch.double)
    noisy, _ = private_mean(zeros, clip_norm=2.0, noise_multiplier=3.0, key=SecretKey.from_seed(1))
    assert abs(float((noisy * 10).std()) / 6.0 - 1) < 0.1
    # A data-dependent row count (a training part after a holdout) is not the divisor: the public size is.
    public, _ = private_mean(x, clip_norm=2.0, noise_multiplier=0.0, key=SecretKey.from_seed(0), public_size=280)
    torch.testing.assert_close(public, reference * 300 / 280)
    with pytest.raises(ValueError, match="clip_norm"):
        private_mean(x, clip_norm=0.0, noise_multiplier=1.0, key=SecretKey.from_seed(0))


def test_probe_samples_poisson_batches_and_divides_by_the_expected_size():
    # Identical examples with logits 0: each contributes g = (-1/2, 1/2) to the bias gradient, so one
    # SGD step of lr 1 leaves bias = -|batch| g / (q N). Dividing by the realised |batch| instead
    # would reveal it, and would make every key give the same bias.
    n, q = 1000, 0.2
    x, y = torch.ones(n, 1), torch.zeros(n, dtype=torch.long)
    sizes = []
    for seed in range(4):
        out = dp_linear_probe(x, y, weight=torch.zeros(2, 1), bias=torch.zeros(2), sample_rate=q, steps=1,
                              noise_multiplier=0.0, max_grad_norm=10.0, lr=1.0, key=SecretKey.from_seed(seed),
                              optimizer="sgd")
        size = float(out.bias[0]) * q * n / 0.5
        assert abs(size - round(size)) < 1e-3
        sizes.append(round(size))
    assert len(set(sizes)) > 1
    assert all(abs(s - q * n) < 5 * math.sqrt(n * q * (1 - q)) for s in sizes)
    # With a public size the expected batch is q * public_size, whatever the row count.
    out = dp_linear_probe(x, y, weight=torch.zeros(2, 1), bias=torch.zeros(2), sample_rate=q, steps=1,
                          noise_multiplier=0.0, max_grad_norm=10.0, lr=1.0, key=SecretKey.from_seed(0),
                          optimizer="sgd", public_size=900)
    assert float(out.bias[0]) * q * 900 / 0.5 == pytest.approx(sizes[0], abs=1e-3)
