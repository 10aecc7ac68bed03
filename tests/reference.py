"""Independent references for the DP tests: explicit per-example gradients, clipped and summed."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def classifier_loss(model, batch: dict) -> torch.Tensor:
    """Per-sample cross-entropy of an HF sequence classifier, shape (B,)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    logits = model(**inputs).logits
    return F.cross_entropy(logits, batch["labels"], reduction="none")


def lm_loss(model, batch: dict) -> torch.Tensor:
    """Per-sample causal-LM loss written out position by position: the mean over t >= 1 with
    labels[t] != -100 of -log p(labels[t] | tokens < t); 0 for a sample with no such position."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = []
    for i in range(logits.shape[0]):
        terms = [-torch.log_softmax(logits[i, t - 1], -1)[batch["labels"][i, t]]
                 for t in range(1, logits.shape[1]) if int(batch["labels"][i, t]) != -100]
        losses.append(torch.stack(terms).mean() if terms else logits[i].sum() * 0)
    return torch.stack(losses)


def per_example_grads(model, batch: dict, loss_fn=classifier_loss) -> list[dict[str, torch.Tensor]]:
    """One backward per example: the gradient of each example's loss, by parameter name."""
    size = batch["labels"].shape[0]
    out = []
    for i in range(size):
        model.zero_grad(set_to_none=True)
        one = {k: v[i:i + 1] for k, v in batch.items()}
        loss_fn(model, one).sum().backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None})
    model.zero_grad(set_to_none=True)
    return out


def module_groups(model) -> dict[str, list[str]]:
    """Parameter names grouped by the module that owns them (the per-layer clipping groups)."""
    groups: dict[str, list[str]] = {}
    for mname, module in model.named_modules():
        own = [f"{mname}.{n}" if mname else n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own:
            groups[mname] = own
    return groups


def clipped_sum(model, grads: list[dict], max_grad_norm: float, clipping: str, weights=None) -> dict[str, torch.Tensor]:
    """sum_i w_i * clip(g_i): flat (one norm) or per_layer (C / sqrt(L) per module)."""
    names = list(grads[0]) if grads else []
    total = {n: torch.zeros_like(grads[0][n]) for n in names}
    groups = module_groups(model)
    threshold = max_grad_norm / math.sqrt(len(groups))
    for i, g in enumerate(grads):
        w = 1.0 if weights is None else float(weights[i])
        if clipping == "flat":
            norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g.values()))
            factor = min(1.0, max_grad_norm / (norm + 1e-6))
            for n in names:
                total[n] += w * factor * g[n]
        else:
            for params in groups.values():
                norm = math.sqrt(sum(float(g[n].pow(2).sum()) for n in params if n in g))
                factor = min(1.0, threshold / (norm + 1e-6))
                for n in params:
                    if n in g:
                        total[n] += w * factor * g[n]
    return total
