"""Per-sample losses: what the DP step clips. Each takes (forward, batch) and returns shape (B,)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def sequence_classification_loss(forward, batch: dict) -> torch.Tensor:
    return classification_losses(forward(**model_inputs(batch)).logits, batch["labels"])


def classification_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none")


def causal_lm_loss(forward, batch: dict) -> torch.Tensor:
    """Per-sample mean next-token cross-entropy over the positions whose label is not -100 (the text
    and its EOS; never a control-code prefix or padding). A sample with no such position has loss 0."""
    logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return next_token_losses(logits, batch["labels"])


def next_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits against (B, T) labels (-100: no loss), shifted by one: per-sample mean."""
    targets = labels[:, 1:]
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
    counted = (targets != -100).sum(1)
    return per_token.sum(1) / counted.clamp(min=1)
