"""Gaussian noise for the summed clipped gradient: N(0, sigma^2 C^2) once per coordinate.

The generator for a step is derived from (seed, step, stream): resuming at step s draws exactly
the noise an uninterrupted run would have, and there is no generator state to lose. ``stream``
separates ranks that own disjoint partitions (ZeRO >= 1: independent noise per partition); ranks
that each hold a full replica (ZeRO 0) must use the same stream so they apply identical noise.
"""

from __future__ import annotations

import torch

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, step, stream) over 63 bits


def step_generator(seed: int, step: int, stream: int, device: torch.device) -> torch.Generator:
    key = (int(seed) * _MIX + int(step) * 1_000_003 + int(stream) * 7_919 + 1) % (2**63 - 1)
    gen = torch.Generator(device=device)
    gen.manual_seed(key)
    return gen


def add_gaussian_noise_(tensors: list[torch.Tensor], std: float, seed: int, step: int, stream: int) -> None:
    """In place: t += N(0, std^2), independently per coordinate, reproducibly for (seed, step, stream)."""
    if std == 0 or not tensors:
        return
    gen = step_generator(seed, step, stream, tensors[0].device)
    for t in tensors:
        if t.device != gen.device:
            gen = step_generator(seed, step, stream, t.device)
        noise = torch.randn(t.shape, generator=gen, device=t.device, dtype=torch.float32)
        t.add_(noise.mul_(std).to(t.dtype))
