"""Per-sample clipping inside one backward pass, for every trainable layer of a model.

Each supported layer type has a DP forward (registered with ``register_dp_layer``) that runs the
layer through a custom autograd Function. Its backward computes the input gradient as usual and
then, depending on the clipper's mode:

* ``NORMS``     adds the layer's per-sample squared gradient norms to ``clipper.sq_norms`` and
                returns no weight gradient (the first pass of flat clipping);
* ``PER_LAYER`` clips each sample's gradient of this layer to C_l = C / sqrt(L) and returns the
                clipped sum as the weight gradient, so autograd (and DeepSpeed's reduction hooks)
                only ever see clipped sums. Since sum_l C_l^2 = C^2, each sample's whole gradient
                has norm <= C: the sensitivity is the same as flat clipping with threshold C.

In ``OFF`` mode the layer runs its ordinary forward (the second, re-weighted pass of flat clipping).
The Functions save the Parameter objects themselves, so DeepSpeed ZeRO-3's pre-backward gather
refills them before the backward runs.
"""

from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

DPForward = Callable[..., torch.Tensor]
# Keyed by "module.QualName" so that rules for third-party layers (transformers' Conv1D, RMSNorm)
# can be registered without importing their library.
_REGISTRY: dict[str, DPForward] = {}


def _key(module_type: type | str) -> str:
    return module_type if isinstance(module_type, str) else f"{module_type.__module__}.{module_type.__qualname__}"


def register_dp_layer(*module_types: type | str) -> Callable[[DPForward], DPForward]:
    """Register ``fn(module, clipper, *args, **kwargs)`` as the DP forward of ``module_types``
    (classes, or their "package.module.ClassName" paths)."""

    def wrap(fn: DPForward) -> DPForward:
        for module_type in module_types:
            _REGISTRY[_key(module_type)] = fn
        return fn

    return wrap


def registered_layer_types() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _dp_forward_for(module: nn.Module) -> DPForward | None:
    for klass in type(module).__mro__:
        fn = _REGISTRY.get(_key(klass))
        if fn is not None:
            return fn
    return None


class UnsupportedLayerError(ValueError):
    """A trainable layer has no per-sample rule: its gradient could not be clipped."""


class TiedWeightsError(ValueError):
    """One trainable parameter is used by several layers: per-layer norms would undercount it."""


class ClipMode(enum.Enum):
    OFF = "off"
    NORMS = "norms"
    PER_LAYER = "per_layer"


@dataclass
class DPLayer:
    name: str
    module: nn.Module
    forward: DPForward
    methods: dict = field(default_factory=dict)  # e.g. {"ghost": n, "direct": m} calls, for the report


def _own_trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def find_dp_layers(model: nn.Module) -> list[DPLayer]:
    """Every module owning trainable parameters, each with its DP forward; refuses what can't be clipped."""
    unsupported, layers = [], []
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        own = _own_trainable(module)
        if not own:
            continue
        for _, p in own:
            owners.setdefault(id(p), []).append(name or "<root>")
        fn = _dp_forward_for(module)
        if fn is None:
            unsupported.append(f"{name or '<root>'} ({type(module).__module__}.{type(module).__name__})")
        else:
            layers.append(DPLayer(name=name, module=module, forward=fn))
    if unsupported:
        supported = ", ".join(sorted(k.rsplit(".", 1)[-1] for k in _REGISTRY))
        raise UnsupportedLayerError(
            "these trainable modules have no per-sample gradient rule, so their gradients could not be "
            f"clipped: {'; '.join(unsupported)}. Freeze them (requires_grad=False), replace them, or "
            f"register a rule with dist_dpc.privacy.register_dp_layer. Supported: {supported}")
    shared = {k: v for k, v in owners.items() if len(v) > 1}
    if shared:
        users = "; ".join(" + ".join(v) for v in shared.values())
        raise TiedWeightsError(
            f"tied trainable weights are shared by several modules ({users}); per-sample norms of a shared "
            "weight need the cross terms between its uses, which are not computed. Untie them (e.g. "
            "tie_word_embeddings=False in the model config) or freeze the shared weight.")
    # A module reached twice (same object under two names) keeps one entry.
    unique, seen = [], set()
    for layer in layers:
        if id(layer.module) not in seen:
            seen.add(id(layer.module))
            unique.append(layer)
    return unique


class PerSampleClipper:
    """Holds the clipping mode and the per-sample quantities of the current micro-batch."""

    def __init__(self, model: nn.Module, max_grad_norm: float):
        self.layers = find_dp_layers(model)
        self.layer_by_module = {id(layer.module): layer for layer in self.layers}
        if not self.layers:
            raise ValueError("the model has no trainable parameters to train with DP-SGD")
        self.max_grad_norm = float(max_grad_norm)
        self.layer_threshold = self.max_grad_norm / math.sqrt(len(self.layers))
        self.mode = ClipMode.OFF
        self.batch_size: int | None = None
        self.sq_norms: torch.Tensor | None = None  # (B,) sum over layers of squared norms (before clipping)
        self.clipped: torch.Tensor | None = None   # (B,) bool: some layer of this sample was clipped
        self._attached = False

    # -- wiring ---------------------------------------------------------------------------------
    def attach(self) -> "PerSampleClipper":
        for layer in self.layers:
            fn, module = layer.forward, layer.module
            # An instance attribute shadows the class forward; detach() deletes it again.
            module.forward = _BoundDPForward(fn, module, self)
        self._attached = True
        return self

    def detach(self) -> None:
        for layer in self.layers:
            if isinstance(layer.module.__dict__.get("forward"), _BoundDPForward):
                del layer.module.forward
        self._attached = False

    @contextlib.contextmanager
    def pass_mode(self, mode: ClipMode, batch_size: int):
        """Run one forward/backward in ``mode`` over a micro-batch of ``batch_size`` rows."""
        assert self._attached, "attach() the clipper before running DP passes"
        self.mode, self.batch_size = mode, batch_size
        self.sq_norms = None
        self.clipped = None
        try:
            yield self
        finally:
            self.mode = ClipMode.OFF

    # -- called from the layers' backward ----------------------------------------------------
    def add_sq_norms(self, sq_B: torch.Tensor) -> None:
        self.sq_norms = sq_B if self.sq_norms is None else self.sq_norms + sq_B

    def layer_factors(self, sq_B: torch.Tensor) -> torch.Tensor:
        """Clip factors min(1, C_l / ||g_i,l||) for one layer; records norms for statistics."""
        self.add_sq_norms(sq_B)
        norms = sq_B.sqrt()
        clipped = norms > self.layer_threshold
        self.clipped = clipped if self.clipped is None else (self.clipped | clipped)
        return (self.layer_threshold / (norms + 1e-6)).clamp(max=1.0)

    def flat_factors(self, sq_B: torch.Tensor) -> torch.Tensor:
        """Clip factors min(1, C / ||g_i||) from the whole per-sample norm (flat clipping)."""
        norms = sq_B.sqrt()
        self.clipped = norms > self.max_grad_norm
        return (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)

    def method_summary(self) -> dict[str, dict]:
        return {layer.name: dict(layer.methods) for layer in self.layers}


class _BoundDPForward:
    """module.forward replacement: the DP forward while a DP pass runs, else the class forward."""

    def __init__(self, fn: DPForward, module: nn.Module, clipper: PerSampleClipper):
        self.fn, self.clipper = fn, clipper
        self.module_ref = module  # a strong ref is fine: module owns this object

    def __call__(self, *args, **kwargs):
        if self.clipper.mode is ClipMode.OFF:
            return type(self.module_ref).forward(self.module_ref, *args, **kwargs)
        return self.fn(self.module_ref, self.clipper, *args, **kwargs)


def record_method(clipper: PerSampleClipper, module: nn.Module, method: str) -> None:
    """Count which norm method each layer used (ghost or direct), for the run's report."""
    layer = clipper.layer_by_module[id(module)]
    layer.methods[method] = layer.methods.get(method, 0) + 1
