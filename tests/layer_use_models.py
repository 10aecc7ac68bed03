"""Small models whose supported layers are *used* in ways per-layer rules cannot clip: a layer run
twice in one pass (shared across depth, as in ALBERT), and weights read without the module's forward
(nn.MultiheadAttention's out_proj, a parent reading its child's weight). Inputs: input_ids (B, T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, WIDTH = 12, 6


def misuse_loss(forward, batch: dict) -> torch.Tensor:
    """Per-sample cross-entropy, (B,); works for these models and HF classifiers (``.logits``)."""
    out = forward(input_ids=batch["input_ids"])
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits.float(), batch["labels"], reduction="none")


def misuse_batch(batch_size: int = 4, length: int = 5, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, VOCAB, (batch_size, length), generator=gen),
            "labels": torch.randint(0, 2, (batch_size,), generator=gen), "sample_mask": torch.ones(batch_size)}


class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.head = nn.Linear(WIDTH, 2)

    def body(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(input_ids)).mean(1))


class TwiceCalledLinear(_Base):
    """One nn.Linear applied twice in a row (weights shared across depth)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(WIDTH, WIDTH)

    def body(self, h):
        return self.shared(torch.tanh(self.shared(h)))


class SharedAcrossDepth(_Base):
    """A hand-made ALBERT: one block (Linear + LayerNorm) run ``depth`` times."""

    def __init__(self, depth: int = 3):
        super().__init__()
        self.depth = depth
        self.block = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.LayerNorm(WIDTH))

    def body(self, h):
        for _ in range(self.depth):
            h = h + self.block(h)
        return h


class AttentionOutProj(_Base):
    """nn.MultiheadAttention reads out_proj.weight inside F.multi_head_attention_forward, never
    calling out_proj. Its in_proj (owned by the attention module itself) is frozen; ``plain_out_proj``
    swaps the NonDynamicallyQuantizableLinear for a plain nn.Linear so the type check passes and only
    the use is wrong."""

    def __init__(self, plain_out_proj: bool = True):
        super().__init__()
        self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.attention.in_proj_weight.requires_grad_(False)
        self.attention.in_proj_bias.requires_grad_(False)
        if plain_out_proj:
            self.attention.out_proj = nn.Linear(WIDTH, WIDTH)

    def body(self, h):
        return self.attention(h, h, h, need_weights=False)[0]


class ParentReadsChild(_Base):
    """A parent module that computes with its child Linear's weight instead of calling the child."""

    def __init__(self):
        super().__init__()
        self.child = nn.Linear(WIDTH, WIDTH)

    def body(self, h):
        return torch.tanh(F.linear(h, self.child.weight, self.child.bias))


def tiny_albert():
    """transformers' ALBERT from a config (no download): one layer group shared by 3 layers."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    config = AlbertConfig(vocab_size=VOCAB, embedding_size=8, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
    torch.manual_seed(0)
    return AlbertForSequenceClassification(config)
