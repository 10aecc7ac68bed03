"""nn.Embedding, including position ids of batch size 1 broadcast across the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_dpc.privacy import per_sample
from dist_dpc.privacy.clipper import ClipMode, PerSampleClipper, record_method, register_dp_layer


class DPEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, clipper: PerSampleClipper, module: nn.Module):
        ctx.save_for_backward(ids, weight)
        ctx.clipper, ctx.mode, ctx.padding_idx, ctx.module = clipper, clipper.mode, padding_idx, module
        ctx.params = (weight,) if clipper.mode is ClipMode.BOOKKEEP else None  # the Parameter, for the hand-over
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, g):
        ids, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        ids_BT = ids.reshape(ids.shape[0], -1)
        g_BTD = g.reshape(g.shape[0], -1, g.shape[-1])
        record_method(ctx.clipper, ctx.module, "ghost")
        sq = per_sample.embedding_sq_norms(ids_BT, g_BTD, ctx.padding_idx)
        if ctx.mode is ClipMode.NORMS:
            ctx.clipper.add_sq_norms(sq)
            return None, None, None, None, None
        rows, dtype, padding_idx = weight.shape[0], weight.dtype, ctx.padding_idx

        def clipped_sums(factors):
            return (per_sample.embedding_clipped_grad(ids_BT, g_BTD, factors, rows, padding_idx).to(dtype),)

        if ctx.mode is ClipMode.BOOKKEEP:
            ctx.clipper.defer(ctx.module, sq, ctx.params, clipped_sums)
            return None, None, None, None, None
        return (None, *clipped_sums(ctx.clipper.layer_factors(sq, dtype)), None, None, None)


def dp_embedding(module: nn.Embedding, clipper: PerSampleClipper, ids: torch.Tensor) -> torch.Tensor:
    if module.max_norm is not None or module.sparse:
        raise ValueError(f"nn.Embedding with max_norm or sparse=True is not supported under DP-SGD ({module})")
    if module.scale_grad_by_freq:
        # The real (flat) pass would divide each token's gradient by its count in the whole
        # micro-batch: one sample would change the others' gradients, beyond what clipping bounds.
        raise ValueError(f"nn.Embedding with scale_grad_by_freq=True is not supported under DP-SGD ({module}): it scales "
                         "each token's gradient by its frequency in the whole micro-batch, so samples interact; set it to False")
    batch = clipper.batch_size
    if ids.dim() >= 1 and ids.shape[0] == 1 and batch is not None and batch > 1:
        # Shared ids (e.g. position ids of shape (1, T)) would sum the batch's gradients before
        # we see them; giving every sample its own copy keeps per-sample gradients separable.
        ids = ids.expand(batch, *ids.shape[1:])
    clipper.check_batch_dim(module, ids, "ids tensor")
    return DPEmbeddingFunction.apply(ids, module.weight, module.padding_idx, clipper, module)


register_dp_layer(nn.Embedding)(dp_embedding)
