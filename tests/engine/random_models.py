"""Random small models from the supported layer types, for the engine's property test.

A spec is a JSON-able dict (it travels to the torchrun worker), drawn by ``random_specs`` from a
seeded python RNG: token embedding (optionally with padding_idx) and position embedding (ids of
shape (1, T), broadcast across the batch), 1-3 blocks of Linear or GPT-2 Conv1D + tanh + optional
LayerNorm, widths 3-12, a Linear head on the masked mean; a random subset of parameters frozen.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

import dist_dpc.models  # noqa: F401  (registers the rule for transformers' Conv1D)


def random_model_loss(forward, batch: dict) -> torch.Tensor:
    """Per-sample cross-entropy, (B,): what DPEngine clips (module-level, so the worker imports it)."""
    logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(logits.float(), batch["labels"], reduction="none")


class RandomStack(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(spec["seed"])
        widths = spec["widths"]
        self.embed = nn.Embedding(spec["vocab"], widths[0], padding_idx=0 if spec["padding_idx"] else None)
        self.position = nn.Embedding(spec["length"], widths[0]) if spec["position"] else None
        self.blocks = nn.ModuleList()
        for block, width_in, width_out in zip(spec["blocks"], widths, widths[1:]):
            proj = nn.Linear(width_in, width_out) if block["kind"] == "linear" else Conv1D(width_out, width_in)
            norm = nn.LayerNorm(width_out) if block["norm"] else nn.Identity()
            self.blocks.append(nn.Sequential(proj, nn.Tanh(), norm))
        self.head = nn.Linear(widths[-1], 2)
        for name, p in self.named_parameters():
            p.requires_grad_(name not in spec["frozen"])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        if self.position is not None:
            h = h + self.position(torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0))
        for block in self.blocks:
            h = block(h)
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1).clamp(min=1))


def random_spec(rng: random.Random, seed: int) -> dict:
    depth = rng.randint(1, 3)
    spec = {"seed": seed, "vocab": rng.randint(5, 20), "length": rng.randint(1, 6),
            "widths": [rng.randint(3, 12) for _ in range(depth + 1)], "padding_idx": rng.random() < 0.5,
            "position": rng.random() < 0.5,
            "blocks": [{"kind": rng.choice(["linear", "conv1d"]), "norm": rng.random() < 0.5} for _ in range(depth)],
            "max_grad_norm": rng.choice([0.02, 0.2, 5.0]), "frozen": []}
    names = [n for n, _ in RandomStack(spec).named_parameters()]
    frozen = [n for n in names if rng.random() < 0.3]
    if len(frozen) == len(names):
        frozen.pop(rng.randrange(len(frozen)))
    spec["frozen"] = frozen
    return spec


def random_specs(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [random_spec(rng, seed * 1000 + i) for i in range(count)]
