"""Where a BERT-family sequence classifier keeps its head: [CLS] hidden state -> pooler (dense + tanh)
-> dropout -> classifier (linear). Used to centre the pooler and to fit the classifier on fixed
features (dist_dpc.pipeline.head_init); other architectures are refused with a clear message."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dist_dpc.engine.losses import model_inputs


@dataclass
class PooledHead:
    encoder: nn.Module      # returns last_hidden_state
    pooler: nn.Module       # .dense (Linear hidden -> hidden) and .activation
    classifier: nn.Linear   # pooled -> logits

    @property
    def hidden_size(self) -> int:
        return self.pooler.dense.in_features


def _find_pooled_head(model: nn.Module) -> tuple[nn.Module, PooledHead | None]:
    # A peft model (DP-LoRA) is looked through: its adapters sit inside the encoder, its head is the model's own.
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    encoder = getattr(model, "base_model", None)
    pooler = getattr(encoder, "pooler", None)
    classifier = getattr(model, "classifier", None)
    if (pooler is None or not isinstance(getattr(pooler, "dense", None), nn.Linear)
            or not isinstance(classifier, nn.Linear)):
        return model, None
    return model, PooledHead(encoder, pooler, classifier)


def has_pooled_head(model: nn.Module) -> bool:
    """Whether ``model`` is a BERT-style classifier ([CLS] -> pooler dense+tanh -> linear classifier)."""
    return _find_pooled_head(model)[1] is not None


def pooled_head(model: nn.Module, field: str) -> PooledHead:
    """The head of a BERT-style classifier; ``field`` names the setting that asked for it."""
    model, head = _find_pooled_head(model)
    if head is None:
        raise ValueError(f"{field} needs a BERT-style classifier ([CLS] -> pooler dense+tanh -> linear classifier); "
                         f"{type(model).__name__} has none: set {field} off for this model")
    return head


@torch.no_grad()
def cls_hidden(head: PooledHead, batch: dict) -> torch.Tensor:
    """The final [CLS] hidden state, (B, hidden), of the encoder in its current mode."""
    return head.encoder(**model_inputs(batch)).last_hidden_state[:, 0]


@torch.no_grad()
def pool(head: PooledHead, cls: torch.Tensor) -> torch.Tensor:
    """What the classifier sees (before dropout) for these [CLS] states: in float32, where ``cls`` lies
    (head_init keeps the features on the CPU; the head may sit on a GPU, and in bf16 at ZeRO 3)."""
    dense = head.pooler.dense
    weight = dense.weight.detach().to(cls.device, torch.float32)
    bias = dense.bias.detach().to(cls.device, torch.float32)
    return head.pooler.activation(cls.float() @ weight.T + bias)


@torch.no_grad()
def centre_pooler_(head: PooledHead, mean: torch.Tensor) -> None:
    """pooler(h) = tanh(h - mean): identity weights, bias -mean. The architecture (and so
    AutoModelForSequenceClassification.from_pretrained) is unchanged."""
    dense = head.pooler.dense
    dense.weight.copy_(torch.eye(dense.out_features, dense.in_features, dtype=dense.weight.dtype))
    dense.bias.copy_(-mean.to(dense.bias.dtype))


@torch.no_grad()
def set_classifier_(head: PooledHead, weight: torch.Tensor, bias: torch.Tensor) -> None:
    head.classifier.weight.copy_(weight.to(head.classifier.weight.dtype))
    head.classifier.bias.copy_(bias.to(head.classifier.bias.dtype))
