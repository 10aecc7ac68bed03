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
backward (book-keeping, at every ZeRO stage) is the same. ``bound_ratio`` is the floor over the
non-DP step: what the arithmetic allows.
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
    family: str = "bert"          # bert (classifier), gpt2 or llama (causal LM with an untied head)
    vocab: int = 0                # the causal LM's head: hidden x vocab, every position
    kv_heads: int | None = None   # llama: grouped-query attention


def linear_shapes(s: Shape) -> list[tuple[int, int]]:
    """(in, out) of every trainable matrix product per position: BERT Q, K, V, output, MLP up, down;
    GPT-2 the fused QKV (Conv1D), output, MLP up, down; Llama Q, K, V (grouped), output, gate, up,
    down; and a causal LM's head (the classifier's head and pooler are negligible)."""
    h, f = s.hidden, s.intermediate
    if s.family == "bert":
        per_layer = [(h, h)] * 4 + [(h, f), (f, h)]
    elif s.family == "gpt2":
        per_layer = [(h, 3 * h), (h, h), (h, f), (f, h)]
    elif s.family == "llama":
        kv = h // s.heads * (s.kv_heads or s.heads)
        per_layer = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]
    else:
        raise ValueError(f"family {s.family!r}: bert, gpt2 or llama")
    head = [(h, s.vocab)] if s.family != "bert" else []
    return per_layer * s.layers + head


def norm_flops(b: int, t: int, i: int, o: int) -> tuple[str, float]:
    from dist_dpc.privacy.per_sample import GHOST, choose_linear_method

    method = choose_linear_method(t, i, o)
    if method == GHOST:
        return method, 2.0 * b * t * t * (i + o) + 2.0 * b * t * t
    return method, 2.0 * b * t * i * o + 2.0 * b * i * o


def step_costs(s: Shape) -> dict:
    """FLOPs of the non-DP step and of the DP norms."""
    b, t = s.batch, s.length
    linear_fwd = sum(2.0 * b * t * i * o for i, o in linear_shapes(s))
    attention_fwd = 4.0 * b * t * t * s.hidden * s.layers
    non_dp = 3 * linear_fwd + 3 * attention_fwd  # forward, input gradients, weight gradients (+ attention)
    methods, norms = {}, 0.0
    for i, o in linear_shapes(s):
        method, flops = norm_flops(b, t, i, o)
        methods[method] = methods.get(method, 0) + 1
        norms += flops + b * t * o  # the per-sample factors on the output gradients
    # flat is one forward and one backward (book-keeping): its floor is per_layer's
    return {"non_dp_flops": non_dp, "norm_flops": norms, "norm_methods": methods,
            "per_layer_bound": (non_dp + norms) / non_dp, "flat_bound": (non_dp + norms) / non_dp}


def bound_ratio(s: Shape, mode: str) -> float | None:
    """The arithmetic floor of ``mode``'s step over the non-DP step (None: no DP bound, e.g. Opacus)."""
    costs = step_costs(s)
    return {"non-dp": 1.0, "per_layer": costs["per_layer_bound"], "flat": costs["flat_bound"]}.get(mode)
