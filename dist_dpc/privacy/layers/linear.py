"""nn.Linear (any leading dims) and, through ``transposed``, GPT-2-style Conv1D (y = x W + b)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_dpc.privacy import per_sample
from dist_dpc.privacy.clipper import ClipMode, PerSampleClipper, record_method, register_dp_layer


class DPLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, clipper: PerSampleClipper, transposed: bool, module: nn.Module):
        # Save the Parameter itself (not a detached view): ZeRO-3 refills it before backward.
        ctx.save_for_backward(x, weight)
        ctx.clipper, ctx.mode, ctx.transposed, ctx.module = clipper, clipper.mode, transposed, module
        ctx.has_bias = bias is not None
        # BOOKKEEP hands the Parameters themselves to the hand-over (autograd's unpacked copies need not be them)
        ctx.params = (weight, bias) if clipper.mode is ClipMode.BOOKKEEP else None
        w = weight.t() if transposed else weight
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        w = weight.t() if ctx.transposed else weight  # (O, I)
        grad_x = g @ w if ctx.needs_input_grad[0] else None
        weight_trainable = ctx.needs_input_grad[1]
        bias_trainable = ctx.has_bias and ctx.needs_input_grad[2]
        if not (weight_trainable or bias_trainable):
            return grad_x, None, None, None, None, None
        a_BTI = per_sample.flatten_positions(x)
        g_BTO = per_sample.flatten_positions(g)
        method = per_sample.choose_linear_method(a_BTI.shape[1], a_BTI.shape[2], g_BTO.shape[2])
        record_method(ctx.clipper, ctx.module, method)
        sq = per_sample.linear_sq_norms(a_BTI, g_BTO, weight_trainable, bias_trainable, method)
        if ctx.mode is ClipMode.NORMS:
            ctx.clipper.add_sq_norms(sq)
            return grad_x, None, None, None, None, None
        transposed, dtype = ctx.transposed, weight.dtype

        def clipped_sums(factors):
            grad_w, grad_b = per_sample.linear_clipped_grads(a_BTI, g_BTO, factors, weight_trainable, bias_trainable)
            if grad_w is not None:
                grad_w = (grad_w.t() if transposed else grad_w).to(dtype)
            return grad_w, grad_b.to(dtype) if grad_b is not None else None

        if ctx.mode is ClipMode.BOOKKEEP:
            ctx.clipper.defer(ctx.module, sq, (ctx.params[0] if weight_trainable else None, ctx.params[1] if bias_trainable else None),
                              clipped_sums)
            return grad_x, None, None, None, None, None
        return (grad_x, *clipped_sums(ctx.clipper.layer_factors(sq, dtype)), None, None, None)


def dp_linear(module: nn.Linear, clipper: PerSampleClipper, x: torch.Tensor) -> torch.Tensor:
    clipper.check_batch_dim(module, x)
    return DPLinearFunction.apply(x, module.weight, module.bias, clipper, False, module)


register_dp_layer(nn.Linear)(dp_linear)
