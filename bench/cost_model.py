"""Analytic FLOP model of a non-DP step and of what DP-SGD adds, for bench/dp_step.py.

Counted: every matrix product of the transformer's Linear layers (forward 2BTIO, input gradient
2BTIO, weight gradient 2BTIO when the weight trains) and of attention (QK^T and AV: forward
4BT^2 d per layer, backward twice that). Not counted: elementwise work (norms, softmax, GELU,
the optimizer), which is the same in both steps or small. What DP adds, per trainable Linear:

  * the per-sample squared norm, by the method the engine picks for the shape
    (dist_dpc.privacy.per_sample.choose_linear_method): ghost 2BT^2 (I + O) + 2BT^2, or direct
    2BTIO (per-sample gradients) + 2BIO;
  * the clipped sum itself costs what the non-DP weight gradient costs (the factors scale the
    output gradients: BTO more).

So the floor of a per-layer-clipped step is non-DP + norms, and that of flat clipping in one
backward (book-keeping) is the same; the two-pass flat step adds a forward and an input-gradient
backward. ``bound_ratio`` is the floor over the non-DP step: what the arithmetic allows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    batch: int
    length: int
    hidden: int
    layers: int
    intermediate: int
    heads: int


def linear_shapes(s: Shape) -> list[tuple[int, int]]:
    """(in, out) of every Linear of a BERT-style encoder layer stack: Q, K, V, output, MLP up, down."""
    h, f = s.hidden, s.intermediate
    return [(h, h)] * 4 * s.layers + [(h, f), (f, h)] * s.layers


def norm_flops(b: int, t: int, i: int, o: int) -> tuple[str, float]:
    from dist_dpc.privacy.per_sample import GHOST, choose_linear_method

    method = choose_linear_method(t, i, o)
    if method == GHOST:
        return method, 2.0 * b * t * t * (i + o) + 2.0 * b * t * t
    return method, 2.0 * b * t * i * o + 2.0 * b * i * o


def step_costs(s: Shape) -> dict:
    """FLOPs of the non-DP step, of the DP norms, and of the two-pass flat step's extra pass."""
    b, t = s.batch, s.length
    linear_fwd = sum(2.0 * b * t * i * o for i, o in linear_shapes(s))
    attention_fwd = 4.0 * b * t * t * s.hidden * s.layers
    non_dp = 3 * linear_fwd + 3 * attention_fwd  # forward, input gradients, weight gradients (+ attention)
    methods, norms = {}, 0.0
    for i, o in linear_shapes(s):
        method, flops = norm_flops(b, t, i, o)
        methods[method] = methods.get(method, 0) + 1
        norms += flops + b * t * o  # the per-sample factors on the output gradients
    # flat today: a norms-only pass (forward, input gradients, norms), then the ordinary step
    flat_two_pass = non_dp + 2 * linear_fwd + 3 * attention_fwd + norms
    return {"non_dp_flops": non_dp, "norm_flops": norms, "norm_methods": methods,
            "per_layer_bound": (non_dp + norms) / non_dp, "flat_bound": (non_dp + norms) / non_dp,
            "flat_two_pass_arithmetic": flat_two_pass / non_dp}


def bound_ratio(s: Shape, mode: str) -> float | None:
    """The arithmetic floor of ``mode``'s step over the non-DP step (None: no DP bound, e.g. Opacus)."""
    costs = step_costs(s)
    return {"non-dp": 1.0, "per_layer": costs["per_layer_bound"], "flat": costs["flat_bound"]}.get(mode)
