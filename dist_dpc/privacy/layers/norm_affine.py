"""Normalisation layers as normalize-then-affine: the affine part carries the trainable params.

``dp_affine`` serves any y = xhat * weight (+ bias) layer whose normalisation has no parameters
(nn.LayerNorm here; Llama's RMSNorm is registered in dist_dpc.models).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_dpc.privacy import per_sample
from dist_dpc.privacy.clipper import ClipMode, PerSampleClipper, register_dp_layer


class DPAffineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xhat, weight, bias, clipper: PerSampleClipper, module: nn.Module):
        ctx.save_for_backward(xhat, weight)
        ctx.clipper, ctx.mode, ctx.has_bias, ctx.module = clipper, clipper.mode, bias is not None, module
        ctx.params = (weight, bias) if clipper.mode is ClipMode.BOOKKEEP else None  # the Parameters, for the hand-over
        out = xhat * weight
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, g):
        xhat, weight = ctx.saved_tensors
        grad_xhat = g * weight if ctx.needs_input_grad[0] else None
        weight_trainable = weight is not None and ctx.needs_input_grad[1]
        bias_trainable = ctx.has_bias and ctx.needs_input_grad[2]
        if not (weight_trainable or bias_trainable):
            return grad_xhat, None, None, None, None
        d = weight.numel()
        xhat_BTD = xhat.reshape(xhat.shape[0], -1, d)
        g_BTD = g.reshape(g.shape[0], -1, d)
        sq = per_sample.affine_sq_norms(xhat_BTD, g_BTD, weight_trainable, bias_trainable)
        if ctx.mode is ClipMode.NORMS:
            ctx.clipper.add_sq_norms(sq)
            return grad_xhat, None, None, None, None
        shape, dtype = weight.shape, weight.dtype

        def clipped_sums(factors):
            gw, gb = per_sample.affine_clipped_grads(xhat_BTD, g_BTD, factors, weight_trainable, bias_trainable)
            return (gw.reshape(shape).to(dtype) if gw is not None else None,
                    gb.reshape(shape).to(dtype) if gb is not None else None)

        if ctx.mode is ClipMode.BOOKKEEP:
            ctx.clipper.defer(ctx.module, sq, (ctx.params[0] if weight_trainable else None, ctx.params[1] if bias_trainable else None),
                              clipped_sums)
            return grad_xhat, None, None, None, None
        return (grad_xhat, *clipped_sums(ctx.clipper.layer_factors(sq, dtype)), None, None)


def dp_affine(module: nn.Module, clipper: PerSampleClipper, xhat: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return xhat if bias is None else xhat + bias
    return DPAffineFunction.apply(xhat, weight, bias, clipper, module)


def dp_layer_norm(module: nn.LayerNorm, clipper: PerSampleClipper, x: torch.Tensor) -> torch.Tensor:
    clipper.check_batch_dim(module, x)
    xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    return dp_affine(module, clipper, xhat, module.weight, module.bias)


register_dp_layer(nn.LayerNorm)(dp_layer_norm)
