"""Per-sample losses: what the DP step clips. Each takes (forward, batch) and returns shape (B,)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def sequence_classification_loss(forward, batch: dict) -> torch.Tensor:
    logits = forward(**model_inputs(batch)).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="none")
