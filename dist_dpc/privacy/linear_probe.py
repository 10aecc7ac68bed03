"""DP estimates on fixed features of the private examples: a Gaussian mean, and a linear softmax head
trained by DP-SGD (a DP linear probe).

Both read the private data, so both are recorded in the ledger like any DP-SGD phase:
  - private_mean: one Gaussian mechanism, rows clipped to ``clip_norm``, N(0, (sigma*clip_norm)^2) on
    the sum: Mechanism(sigma, sample_rate=1, steps=1);
  - dp_linear_probe: Poisson sampling at rate q, per-example gradients clipped to C (flat, over weight
    and bias together), N(0, sigma^2 C^2) per coordinate on the sum: Mechanism(sigma, q, steps).

Both draw their noise (and the probe its Poisson batches) from generators keyed by a SecretKey that
the caller derives for this one release (dist_dpc.privacy.randomness): never from a small seed.

Dividing by N (the mean) or by q*N (the probe's gradient) treats N as public, as the DP-SGD engine does.
Why a probe at all: under DP noise the head of a pre-trained encoder learns slowly when its input
features share a large common component (docs/results_history.md); on centred features a DP linear probe
reaches the non-private probe's accuracy at small epsilon, and DP fine-tuning then starts from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import numpy as np

from dist_dpc.privacy.randomness import SecretKey, add_gaussian_


def clip_rows(x: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows scaled to norm <= clip_norm, and which rows were scaled. A row with a NaN or inf entry
    becomes 0 (and counts as clipped): one such row would otherwise make the whole sum NaN."""
    finite = torch.isfinite(x).all(dim=1, keepdim=True)
    norms = x.norm(dim=1, keepdim=True)
    factors = torch.where(finite, torch.clamp(clip_norm / norms.clamp_min(1e-12), max=1.0), torch.zeros_like(norms))
    return torch.where(finite, x * factors, torch.zeros_like(x)), (factors < 1).squeeze(1)


def private_mean(x: torch.Tensor, *, clip_norm: float, noise_multiplier: float,
                 key: SecretKey, public_size: int | None = None) -> tuple[torch.Tensor, float]:
    """(sum of rows clipped to clip_norm + N(0, (noise_multiplier*clip_norm)^2 I)) / N, and the clipped
    fraction. N: ``public_size`` where the row count itself depends on the data (a training part
    split off by a data-dependent holdout), so that the division is post-processing of the sum."""
    if clip_norm <= 0:
        raise ValueError(f"clip_norm={clip_norm!r} must be > 0")
    if len(x) == 0:
        raise ValueError("private_mean of no rows")
    clipped, was_clipped = clip_rows(x.double(), clip_norm)
    noise = torch.from_numpy(key.generator("dp-mean").standard_normal(x.shape[1])) * (noise_multiplier * clip_norm)
    return ((clipped.sum(0) + noise) / (public_size or len(x))).to(x.dtype), float(was_clipped.float().mean())


def logit_gradients(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                    alpha: float = 0.0, temperature: float = 1.0) -> torch.Tensor:
    """d loss_i / d logits_i for loss = (1-alpha) CE(labels) + alpha T^2 KL(teacher_T || student_T)
    (alpha = 0: plain cross-entropy), per example: (B, K)."""
    one_hot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    grad = (1 - alpha) * (torch.softmax(logits, 1) - one_hot)
    if alpha:
        if teacher_logits is None:
            raise ValueError("alpha > 0 needs teacher_logits")
        grad = grad + alpha * temperature * (torch.softmax(logits / temperature, 1)
                                             - torch.softmax(teacher_logits / temperature, 1))
    return grad


@dataclass
class ProbeResult:
    weight: torch.Tensor          # (K, D), as nn.Linear stores it
    bias: torch.Tensor            # (K,)
    steps: int
    clipped_fraction: float       # over all sampled examples of all steps


def dp_linear_probe(features: torch.Tensor, labels: torch.Tensor, *, weight: torch.Tensor, bias: torch.Tensor,
                    sample_rate: float, steps: int, noise_multiplier: float, max_grad_norm: float, lr: float,
                    key: SecretKey, teacher_logits: torch.Tensor | None = None, alpha: float = 0.0,
                    temperature: float = 1.0, optimizer: str = "adam", public_size: int | None = None) -> ProbeResult:
    """DP-SGD (Adam, or plain SGD) on logits = features @ weight.T + bias, starting from (weight, bias).

    The per-example gradient of a linear layer is g_i x_i^T (weight) and g_i (bias), g_i the gradient
    wrt the logits, so its norm is ||g_i|| * sqrt(||x_i||^2 + 1): exact, no autograd per example.
    The noisy sum is divided by the expected batch q * N, N = ``public_size`` (default: the row count)."""
    n = len(features)
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate!r} must be in (0, 1]")
    if max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm={max_grad_norm!r} must be > 0")
    x = features.float()
    w = weight.detach().clone().float().requires_grad_(True)
    b = bias.detach().clone().float().requires_grad_(True)
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer={optimizer!r} must be adam or sgd")
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)([w, b], lr=lr)
    expected = sample_rate * (public_size or n)
    clipped = seen = 0
    for step in range(steps):
        idx = torch.from_numpy(np.flatnonzero(key.generator("probe-sampling", step).random(n) < sample_rate))
        xb, yb = x[idx], labels[idx]
        with torch.no_grad():
            g = logit_gradients(xb @ w.T + b, yb, None if teacher_logits is None else teacher_logits[idx].float(),
                                alpha, temperature)
            norms = g.norm(dim=1) * (xb.pow(2).sum(1) + 1).sqrt()
            # An example with a non-finite norm (inf/NaN features or logits) gets factor 0, and its
            # rows of g and x are zeroed before the product (0 * inf = NaN): it is dropped, not
            # allowed to make the whole update NaN.
            finite = torch.isfinite(norms)
            factors = torch.where(finite, torch.clamp(max_grad_norm / norms.clamp_min(1e-12), max=1.0),
                                  torch.zeros_like(norms))
            clipped += int((factors < 1).sum())
            seen += len(idx)
            keep = finite.unsqueeze(1)
            g = torch.where(keep, g * factors.unsqueeze(1), torch.zeros_like(g))
            xk = torch.where(keep, xb, torch.zeros_like(xb))
            grad_w, grad_b = g.T @ xk, g.sum(0)
            std = noise_multiplier * max_grad_norm
            if std:
                add_gaussian_(grad_w, std, key, "probe-noise", step, 0)
                add_gaussian_(grad_b, std, key, "probe-noise", step, 1)
        w.grad, b.grad = grad_w / expected, grad_b / expected
        opt.step()
    return ProbeResult(w.detach(), b.detach(), steps, clipped / seen if seen else 0.0)

