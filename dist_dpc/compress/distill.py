"""DP knowledge distillation (Mireshghallah et al. 2022, Alg. 1): the loss and the student's initialisation.

The student is trained with DP-SGD on the private data; the frozen DP teacher's logits on the same
private batch enter the loss, which is still a per-sample loss, so the DP step clips it like any other.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
            temperature: float) -> torch.Tensor:
    """Per-sample (1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher_T || student_T), shape (B,)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"distill.alpha={alpha!r} is invalid: must be in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"distill.temperature={temperature!r} is invalid: must be > 0")
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    ce = F.cross_entropy(student_logits, labels, reduction="none")
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


def every_other_layer(num_layers: int) -> list[int]:
    """The default layer map: teacher layers 0, 2, 4, ... (half depth, rounded up)."""
    return list(range(0, num_layers, 2))


def _layers(model: nn.Module) -> tuple[nn.Module, str]:
    """The ModuleList of transformer blocks and the config attribute counting them."""
    for path, count in (("bert.encoder.layer", "num_hidden_layers"), ("roberta.encoder.layer", "num_hidden_layers"),
                        ("transformer.h", "n_layer"), ("model.layers", "num_hidden_layers")):
        node = model
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        if isinstance(node, nn.ModuleList):
            return node, count
    raise ValueError(f"{type(model).__name__}: no known stack of transformer layers (BERT, RoBERTa, GPT-2, Llama)")


def student_from_teacher(teacher: nn.Module, layer_map: list[int] | None = None) -> nn.Module:
    """A shallower copy of ``teacher`` keeping the layers in ``layer_map`` (embeddings, pooler and
    classifier copied too). Copying DP weights is post-processing: it costs no privacy."""
    layers, count_attr = _layers(teacher)
    layer_map = every_other_layer(len(layers)) if layer_map is None else list(layer_map)
    if not layer_map or any(not 0 <= i < len(layers) for i in layer_map):
        raise ValueError(f"distill.layer_map={layer_map} is invalid: indices must be in [0, {len(layers)})")
    student = copy.deepcopy(teacher)
    kept, _ = _layers(student)
    new = nn.ModuleList([kept[i] for i in layer_map])
    _set_layers(student, new)
    setattr(student.config, count_attr, len(layer_map))
    if hasattr(student.config, "layer_types") and isinstance(getattr(student.config, "layer_types"), list):
        student.config.layer_types = [student.config.layer_types[i] for i in layer_map]
    for i, layer in enumerate(new):  # attention caches index layers by position
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    return student


def _set_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    for path in ("bert.encoder.layer", "roberta.encoder.layer", "transformer.h", "model.layers"):
        *parents, leaf = path.split(".")
        node = model
        try:
            for part in parents:
                node = getattr(node, part)
            if isinstance(getattr(node, leaf), nn.ModuleList):
                setattr(node, leaf, layers)
                return
        except AttributeError:
            continue
    raise ValueError("no transformer layer stack to replace")
