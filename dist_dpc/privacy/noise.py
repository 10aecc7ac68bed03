"""Gaussian noise for the summed clipped gradient: N(0, sigma^2 C^2) once per coordinate.

The generator for a step is derived from (seed, step, stream): resuming at step s draws exactly
the noise an uninterrupted run would have, and there is no generator state to lose. ``stream``
separates ranks that own disjoint partitions (ZeRO >= 1: independent noise per partition); ranks
that each hold a full replica (ZeRO 0) must use the same stream so they apply identical noise.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of integers; distinct tuples give unrelated seeds."""
    digest = hashlib.blake2b(":".join(str(int(k)) for k in keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def step_generator(seed: int, step: int, stream: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, step, stream))
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
