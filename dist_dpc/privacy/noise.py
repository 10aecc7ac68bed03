"""Gaussian noise for the summed clipped gradient: N(0, sigma^2 C^2) once per coordinate.

Each tensor's draws come from Philox generators keyed by (phase key, labels, tensor index, chunk),
128-bit (dist_dpc.privacy.randomness): there is no generator state to checkpoint, and a label tuple
names its draws exactly. The DP engine's labels are (step, stream, call): ``stream`` separates ranks
that own disjoint partitions (ZeRO >= 1: independent noise per partition); ranks that each hold a
full replica (ZeRO 0) use the same stream so they apply identical noise.
"""

from __future__ import annotations

import torch

from dist_dpc.privacy.randomness import SecretKey, add_gaussian_


def add_gaussian_noise_(tensors: list[torch.Tensor], std: float, key: SecretKey, *labels: int | str) -> None:
    """In place: t += N(0, std^2), independently per coordinate and per tensor; the draws are a
    function of (key, labels, tensor index) alone."""
    if std == 0:
        return
    for index, t in enumerate(tensors):
        add_gaussian_(t, std, key, "gaussian-noise", *labels, index)
