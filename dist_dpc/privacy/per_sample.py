"""Per-sample gradient norms and clipped gradient sums, from a layer's input and output gradient.

Shapes: B batch, T positions (all non-batch, non-feature dims flattened), I input features,
O output features. Norms and clipped sums are computed in at least float32: bf16/fp16 inputs are
upcast, and only the final summed gradient is cast back to the parameter's dtype (by the layer),
so no sample's clip factor is applied to a rounded copy of its gradient.

For a linear map y_t = W a_t (+ b) the per-sample weight gradient is G_i = sum_t g_t a_t^T. Its
squared norm can be had two ways:
  * ghost:  ||G_i||^2 = sum_{t,t'} <a_t, a_t'> <g_t, g_t'>      cost B*T^2*(I+O), memory B*T^2
  * direct: materialise G_i (B*O*I memory) and square it        cost B*T*I*O,   memory B*I*O
``choose_linear_method`` picks the cheaper (ghost when 2*T^2 <= I*O, so always for T = 1).
The clipped sum sum_i c_i G_i = (c*g)^T a never needs per-sample gradients: same cost as a
normal weight gradient.
"""

from __future__ import annotations

import torch

GHOST = "ghost"
DIRECT = "direct"


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Norms and clipped sums accumulate in at least float32 (bf16/fp16 activations are upcast)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def flatten_positions(x_BxI: torch.Tensor) -> torch.Tensor:
    """(B, *, I) -> (B, T, I)."""
    if x_BxI.dim() == 2:
        return x_BxI.unsqueeze(1)
    return x_BxI.reshape(x_BxI.shape[0], -1, x_BxI.shape[-1])


def choose_linear_method(num_positions: int, in_features: int, out_features: int) -> str:
    return GHOST if 2 * num_positions * num_positions <= in_features * out_features else DIRECT


def linear_sq_norms(a_BTI: torch.Tensor, g_BTO: torch.Tensor, weight_trainable: bool, bias_trainable: bool, method: str) -> torch.Tensor:
    """Squared per-sample norm of the (weight, bias) gradient of a linear map, shape (B,)."""
    a = _acc(a_BTI)
    g = _acc(g_BTO)
    sq = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
    if weight_trainable:
        if method == GHOST:
            if a.shape[1] == 1:
                sq = sq + a.squeeze(1).pow(2).sum(-1) * g.squeeze(1).pow(2).sum(-1)
            else:
                aa_BTT = torch.bmm(a, a.transpose(1, 2))
                gg_BTT = torch.bmm(g, g.transpose(1, 2))
                sq = sq + _ghost_sum(aa_BTT, gg_BTT) + ghost_rounding_bound(a, g)
        else:
            grad_BOI = torch.bmm(g.transpose(1, 2), a)
            sq = sq + grad_BOI.pow(2).sum(dim=(1, 2))
    if bias_trainable:
        sq = sq + g.sum(dim=1).pow(2).sum(-1)
    return sq


def _ghost_sum(x_BTT: torch.Tensor, y_BTT: torch.Tensor) -> torch.Tensor:
    """sum_{t,t'} x y per sample, summed in float64 (the T^2 terms may cancel; no summation error
    left to bound). The Hadamard product of two Gram matrices is PSD, so the true sum is >= 0."""
    return (x_BTT.double() * y_BTT.double()).sum(dim=(1, 2)).clamp(min=0).to(y_BTT.dtype)


def ghost_rounding_bound(a_BTI: torch.Tensor | None, g_BTO: torch.Tensor) -> torch.Tensor:
    """An upper bound on how far float rounding can take a ghost norm below the true squared norm.

    The ghost sum sum_{t,t'} <a_t, a_t'><g_t, g_t'> cancels when a sample's positions push its
    gradient in opposite directions; its terms are then far larger than the result, and the
    rounding of the Gram matrices (relative error <= (I+O) u per term, u the unit roundoff) can
    make the computed norm too small (by 19 % in a constructed float32 case): that sample would not
    be clipped enough. Each term is at most |a_t||a_t'||g_t||g_t'|, so the error is at most
    s^2 (I + O + 4) u with s = sum_t |a_t||g_t| (first order; +4 covers the products, the float64
    sum and the final cast). Adding it means the norm used for clipping is never below the true
    one. On ordinary data it raises the norm by well under a percent. ``a_BTI`` None: an embedding
    (a one-hot input: |a_t| = 1, no input Gram matrix)."""
    u = torch.finfo(g_BTO.dtype).eps / 2
    g_norms = g_BTO.norm(dim=2)
    if a_BTI is None:
        s, width = g_norms.sum(1), g_BTO.shape[2]
    else:
        s, width = (a_BTI.norm(dim=2) * g_norms).sum(1), a_BTI.shape[2] + g_BTO.shape[2]
    return s.pow(2) * ((width + 4) * u)


def _dropped_rows_zeroed(t_BTX: torch.Tensor, factors_B: torch.Tensor) -> torch.Tensor:
    """``t`` with the rows of samples whose factor is 0 set to 0. The clipper gives factor 0 to a
    sample with a non-finite norm; its activations or output gradients may hold inf or NaN, and
    0 * inf = NaN would poison the whole clipped sum. A factor-0 sample contributes nothing anyway.
    On an accelerator: torch.where on a per-sample mask, no host sync."""
    keep_B = factors_B != 0
    if t_BTX.device.type == "cpu" and bool(keep_B.all()):
        return t_BTX  # the usual case; on the CPU the check costs no device sync, the copy a full pass
    keep = keep_B.view(-1, *([1] * (t_BTX.dim() - 1)))
    return torch.where(keep, t_BTX, torch.zeros((), dtype=t_BTX.dtype, device=t_BTX.device))


def _clipped_g(g_BTX: torch.Tensor, factors_B: torch.Tensor) -> torch.Tensor:
    g = _acc(g_BTX)
    return _dropped_rows_zeroed(g * factors_B.to(g.dtype).view(-1, 1, 1), factors_B)


def linear_clipped_grads(a_BTI: torch.Tensor, g_BTO: torch.Tensor, factors_B: torch.Tensor, weight_trainable: bool, bias_trainable: bool):
    """sum_i c_i * (per-sample weight grad (O, I), per-sample bias grad (O,)), in at least float32.
    Samples with factor 0 (non-finite norm) have their rows of g and a zeroed first."""
    cg = _clipped_g(g_BTO, factors_B)
    weight_grad = bias_grad = None
    if weight_trainable:
        a = _dropped_rows_zeroed(_acc(a_BTI), factors_B)
        weight_grad = cg.reshape(-1, cg.shape[-1]).t() @ a.reshape(-1, a_BTI.shape[-1])
    if bias_trainable:
        bias_grad = cg.reshape(-1, cg.shape[-1]).sum(0)
    return weight_grad, bias_grad


def embedding_sq_norms(ids_BT: torch.Tensor, g_BTD: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    """||sum_t onehot(id_t) g_t^T||^2 = sum_{t,t'} [id_t = id_t'] <g_t, g_t'>.

    Positions holding ``padding_idx`` receive no gradient in torch's embedding, so they are
    masked out here as well.
    """
    g = _acc(g_BTD)
    if padding_idx is not None:
        g = g * (ids_BT != padding_idx).unsqueeze(-1).to(g.dtype)
    same_BTT = (ids_BT.unsqueeze(2) == ids_BT.unsqueeze(1)).to(g.dtype)
    gg_BTT = torch.bmm(g, g.transpose(1, 2))
    return _ghost_sum(same_BTT, gg_BTT) + ghost_rounding_bound(None, g)


def embedding_clipped_grad(ids_BT: torch.Tensor, g_BTD: torch.Tensor, factors_B: torch.Tensor, num_embeddings: int, padding_idx: int | None) -> torch.Tensor:
    cg = _clipped_g(g_BTD, factors_B)
    if padding_idx is not None:
        cg = cg * (ids_BT != padding_idx).unsqueeze(-1).to(cg.dtype)
    grad = torch.zeros(num_embeddings, cg.shape[-1], dtype=cg.dtype, device=cg.device)
    return grad.index_add_(0, ids_BT.reshape(-1), cg.reshape(-1, cg.shape[-1]))


def affine_sq_norms(xhat_BTD: torch.Tensor, g_BTD: torch.Tensor, weight_trainable: bool, bias_trainable: bool) -> torch.Tensor:
    """Elementwise affine y = xhat * w + b (LayerNorm, RMSNorm): per-sample grads are direct and small."""
    g = _acc(g_BTD)
    sq = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
    if weight_trainable:
        sq = sq + (g * _acc(xhat_BTD)).sum(1).pow(2).sum(-1)
    if bias_trainable:
        sq = sq + g.sum(1).pow(2).sum(-1)
    return sq


def affine_clipped_grads(xhat_BTD: torch.Tensor, g_BTD: torch.Tensor, factors_B: torch.Tensor, weight_trainable: bool, bias_trainable: bool):
    cg = _clipped_g(g_BTD, factors_B)
    weight_grad = (cg * _dropped_rows_zeroed(_acc(xhat_BTD), factors_B)).sum(dim=(0, 1)) if weight_trainable else None
    bias_grad = cg.sum(dim=(0, 1)) if bias_trainable else None
    return weight_grad, bias_grad
