"""Per-sample clipping inside one backward pass, for every trainable layer of a model.

Each supported layer type has a DP forward (registered with ``register_dp_layer``) that runs the
layer through a custom autograd Function. Its backward computes the input gradient as usual and
then, depending on the clipper's mode:

* ``NORMS``     adds the layer's per-sample squared gradient norms to ``clipper.sq_norms`` and
                returns no weight gradient (the first pass of flat clipping);
* ``PER_LAYER`` clips each sample's gradient of this layer to C_l = C / sqrt(L) and returns the
                clipped sum as the weight gradient, so autograd (and DeepSpeed's reduction hooks)
                only ever see clipped sums. Since sum_l C_l^2 = C^2, each sample's whole gradient
                has norm <= C: the sensitivity is the same as flat clipping with threshold C;
* ``BOOKKEEP``  flat clipping in one backward (book-keeping, Bu et al. 2023): like ``NORMS`` it adds
                the per-sample squared norms and returns no weight gradient, and it keeps what the
                clipped sum needs (the layer's input and output gradient); once the backward is
                done every sample's whole norm is known, and each layer's sum of
                min(1, C / ||g_i||) g_i is computed from what was kept, in HAND_OVER;
* ``HAND_OVER`` (after a BOOKKEEP backward, in ``flat_pass``) the layer's forward ignores
                its input and returns a zero scalar whose backward gives the layer's parameters their
                clipped sums. It is entered through the module's own call, so hooks on the module run
                around it as for any use of the layer: at ZeRO 3, DeepSpeed gathers the layer's
                partitioned weights before that backward and reduce-scatters the sums after it.

In ``OFF`` mode the layer runs its ordinary forward.
In the DP modes each layer may run once per pass (``ReusedLayerError`` otherwise), and rules cover
exact types; ``check_no_bypass`` catches weights used outside their module's forward.
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


@dataclass(frozen=True)
class _Rule:
    forward: DPForward
    subclasses: bool  # also serves subclasses (MRO lookup); off by default, see _dp_forward_for


# Keyed by "module.QualName" so that rules for third-party layers (transformers' Conv1D, RMSNorm)
# can be registered without importing their library.
_REGISTRY: dict[str, _Rule] = {}


def _key(module_type: type | str) -> str:
    return module_type if isinstance(module_type, str) else f"{module_type.__module__}.{module_type.__qualname__}"


def register_dp_layer(*module_types: type | str, subclasses: bool = False) -> Callable[[DPForward], DPForward]:
    """Register ``fn(module, clipper, *args, **kwargs)`` as the DP forward of ``module_types``
    (classes, or their "package.module.ClassName" paths).

    A rule serves exactly these types. A subclass may override ``forward`` or read its weights
    elsewhere (torch's NonDynamicallyQuantizableLinear is used by nn.MultiheadAttention, which reads
    its weight directly), so it is only covered when the rule says ``subclasses=True``.
    """

    def wrap(fn: DPForward) -> DPForward:
        for module_type in module_types:
            _REGISTRY[_key(module_type)] = _Rule(fn, subclasses)
        return fn

    return wrap


def registered_layer_types() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _dp_forward_for(module: nn.Module) -> DPForward | None:
    """The rule for ``type(module)`` exactly, else one of its bases registered with subclasses=True."""
    rule = _REGISTRY.get(_key(type(module)))
    if rule is not None:
        return rule.forward
    for klass in type(module).__mro__[1:]:
        rule = _REGISTRY.get(_key(klass))
        if rule is not None and rule.subclasses:
            return rule.forward
    return None


class UnsupportedLayerError(ValueError):
    """A trainable layer has no per-sample rule: its gradient could not be clipped."""


class TiedWeightsError(ValueError):
    """One trainable parameter is used by several layers: per-layer norms would undercount it."""


class ReusedLayerError(ValueError):
    """A DP layer ran twice in one pass (weights shared across depth, a module called twice): its
    per-sample gradient is the sum over the calls, whose norm needs the cross terms between them."""


class BypassedLayerError(ValueError):
    """A trainable parameter got a gradient outside the DP layers, so that gradient is not clipped."""


class AlteredHandOverError(BypassedLayerError):
    """Flat clipping's clipped sums did not reach the parameters exactly as computed: a forward hook
    on the model or a layer scaled, replaced or detached the output of the hand-over call."""


class GradientHookError(BypassedLayerError):
    """A hook on a trainable parameter's gradient would run on the clipped sum before the noise."""


class DetachedLayerError(BypassedLayerError):
    """A DP layer's forward was removed or replaced after attach() (e.g. by a library that swaps
    module forwards for kernels): the layer would run its plain forward and its gradient would not
    be clipped."""


class BatchMixingLayerError(ValueError):
    """A module couples the samples of a micro-batch (BatchNorm): one sample changes the others'
    gradients, so per-sample clipping no longer bounds its influence."""


class BatchDimError(ValueError):
    """A DP layer ran on a tensor whose first dimension is not the micro-batch: it would clip per row
    of that tensor, not per sample."""


class ClipMode(enum.Enum):
    OFF = "off"
    NORMS = "norms"
    PER_LAYER = "per_layer"
    BOOKKEEP = "bookkeep"
    HAND_OVER = "hand_over"


@dataclass
class DPLayer:
    name: str
    module: nn.Module
    forward: DPForward
    methods: dict = field(default_factory=dict)  # e.g. {"ghost": n, "direct": m} calls, for the report


def _own_trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def _subclass_hint(module: nn.Module) -> str:
    """Why a subclass of a supported layer is refused: its forward or its weights' use may differ."""
    base = next((k for k in type(module).__mro__[1:] if _key(k) in _REGISTRY), None)
    if base is None:
        return ""
    return (f", a subclass of {base.__qualname__}: rules cover exact types, since a subclass may change forward or "
            "have its weights read by its parent (nn.MultiheadAttention.out_proj)")


def _mixes_samples(module: nn.Module) -> bool:
    """BatchNorm (any variant) normalises with statistics of the whole micro-batch in training and
    keeps running statistics of the private data; InstanceNorm with track_running_stats keeps them
    too. Whatever they own, they make one sample's gradient depend on the others."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm
    return isinstance(module, _BatchNorm) or (isinstance(module, _InstanceNorm) and module.track_running_stats)


def find_dp_layers(model: nn.Module) -> list[DPLayer]:
    """Every module owning trainable parameters, each with its DP forward; refuses what can't be clipped."""
    unsupported, layers = [], []
    owners: dict[int, list[str]] = {}
    mixing = [f"{name or '<root>'} ({type(module).__module__}.{type(module).__name__})"
              for name, module in model.named_modules() if _mixes_samples(module)]
    if mixing:
        raise BatchMixingLayerError(
            f"these modules mix the samples of a micro-batch: {'; '.join(mixing)}. BatchNorm (and InstanceNorm with "
            "track_running_stats=True) normalise with, or record, statistics over the batch, so one sample changes "
            "every other sample's gradient and per-sample clipping no longer bounds its influence (frozen or "
            "affine=False changes nothing). Replace them by LayerNorm or GroupNorm, or remove them")
    for name, module in model.named_modules(remove_duplicate=False):
        own = _own_trainable(module)
        if not own:
            continue
        for _, p in own:
            owners.setdefault(id(p), []).append(name or "<root>")
        fn = _dp_forward_for(module)
        if fn is None:
            unsupported.append(f"{name or '<root>'} ({type(module).__module__}.{type(module).__name__}){_subclass_hint(module)}")
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
            "weight need the cross terms between its uses, which are not computed. Freeze the shared weight (for a "
            "causal LM's tied input embedding / LM head: model.freeze_embeddings=true, or DP-LoRA with model.lora), "
            "or untie them (tie_word_embeddings=False in the model config, which changes the model).")
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
        _refuse_hub_kernels(model)
        self.model = model
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
        self._called: set[int] = set()             # id(module) of the DP layers run in this pass
        # BOOKKEEP: per layer run, its module, its trainable parameters and a function of the clip
        # factors (B,) giving their clipped gradient sums (it holds the layer's input and output gradient).
        self._deferred: list[tuple[nn.Module, tuple, Callable[[torch.Tensor], tuple]]] = []
        self._handing: dict[int, tuple[tuple, Callable[[], tuple]]] = {}  # HAND_OVER: id(module) -> its sums
        # What the hand-over's backward saw: how many layers' sums it returned and how far the gradient
        # it received strayed from 1 (anything else means a hook altered the call; check_handed_over).
        self._handed_expected, self._handed, self._scale_error = 0, 0, None
        self._deferred_ids: set[int] = set()  # id() of the parameters deferred in this pass
        self._attached = False
        self._forwards: list[tuple[str, nn.Module, object, object]] = []  # every module's forward at attach()

    # -- wiring ---------------------------------------------------------------------------------
    def attach(self) -> "PerSampleClipper":
        for layer in self.layers:
            fn, module = layer.forward, layer.module
            # An instance attribute shadows the class forward; detach() deletes it again.
            module.forward = _BoundDPForward(fn, module, self)
        # Not only the DP layers: a parent whose forward is rewritten later (a fused MLP kernel, a
        # wrapper) may read its children's weights directly, so their DP forwards never run.
        self._forwards = [(name, m, m.__dict__.get("forward"), type(m).forward)
                          for name, m in self.model.named_modules()]
        self._attached = True
        return self

    def detach(self) -> None:
        for layer in self.layers:
            if isinstance(layer.module.__dict__.get("forward"), _BoundDPForward):
                del layer.module.forward
        self._attached = False

    def check_attached(self) -> None:
        """Refuse a pass in which some module's forward is no longer the one attach() saw.

        attach() installs each DP layer's DP forward as an instance attribute; anything that later
        rewrites a forward (transformers' hub-kernel ``kernelize`` on model.train()/eval(), accelerate
        hooks, which copy the wrapped object's attributes onto their wrapper, a user's wrapper, a
        class-level patch) could route a layer's gradient around the clipping after the start-up
        self-test has run. So every module's instance and class forward must still be the very
        objects attach() saw, the DP layers' own _BoundDPForward included (identity, not attributes:
        functools.update_wrapper copies the wrapped object's .clipper onto its wrapper). Identity
        checks over the modules, no host sync."""
        replaced = [name or "<root>" for name, m, instance, cls in self._forwards
                    if m.__dict__.get("forward") is not instance or type(m).forward is not cls]
        if replaced:
            raise DetachedLayerError(
                f"the forward of {len(replaced)} module(s) ({', '.join(replaced[:5])}"
                f"{', ...' if len(replaced) > 5 else ''}) was removed, wrapped or replaced after the clipper attached "
                "the DP layers, so their gradients might not be clipped. Something rewrote module.forward: "
                "transformers >= 5.25 does on model.train()/eval() for a model loaded with use_kernels=True (its default "
                "when the `kernels` package is installed). Load the model with from_pretrained(..., use_kernels=False) "
                "(dist-dpc's loaders do) or set USE_HUB_KERNELS=0, and do not wrap or patch module forwards after "
                "building the engine")

    @contextlib.contextmanager
    def pass_mode(self, mode: ClipMode, batch_size: int):
        """Run one forward/backward in ``mode`` over a micro-batch of ``batch_size`` rows."""
        assert self._attached, "attach() the clipper before running DP passes"
        self.check_attached()
        self.mode, self.batch_size = mode, batch_size
        self.sq_norms = None
        self.clipped = None
        self._called = set()
        self._deferred, self._deferred_ids = [], set()
        self._handed_expected, self._handed, self._scale_error = 0, 0, None  # no count carried from a past pass
        try:
            yield self
        finally:
            self.mode = ClipMode.OFF
            self._deferred, self._deferred_ids = [], set()  # what BOOKKEEP kept is freed with the pass
            self._handing = {}

    def record_call(self, module: nn.Module) -> None:
        """Refuse a DP layer's second call in one pass, before its output (or any gradient) exists.

        Each call's backward would clip (per_layer) or measure (flat) its own share of the
        gradient, but a sample's gradient of a layer run k times is the sum of the k shares, whose
        norm can be up to k times C_l: the sensitivity bound would silently not hold.
        """
        if id(module) in self._called:
            layer = self.layer_by_module[id(module)]
            name = layer.name or "<root>"
            raise ReusedLayerError(
                f"the DP layer {name} ({type(module).__module__}.{type(module).__qualname__}) ran twice in one "
                "forward pass (weights shared across depth, as in ALBERT, or a module called twice): its per-sample "
                "gradient would be clipped per call, not as a whole, and could exceed max_grad_norm. Give each use "
                "its own module, or freeze the shared weights (requires_grad=False)")
        self._called.add(id(module))

    # -- called from the layers' backward ----------------------------------------------------
    def add_sq_norms(self, sq_B: torch.Tensor) -> None:
        self.sq_norms = sq_B if self.sq_norms is None else self.sq_norms + sq_B

    def defer(self, module: nn.Module, sq_B: torch.Tensor, params: tuple,
              clipped_sums: Callable[[torch.Tensor], tuple]) -> None:
        """BOOKKEEP, from ``module``'s backward: count its per-sample squared norms and keep
        ``clipped_sums(factors) -> one gradient per entry of params`` (None for a frozen one)."""
        for param in params:
            if param is not None and id(param) in self._deferred_ids:
                raise ReusedLayerError(
                    "a DP layer's backward ran twice in one flat-clipping pass (a loss_fn that runs its own "
                    "backward or torch.autograd.grad with retain_graph=True): its per-sample norms and clipped sum "
                    "would be counted twice and a sample's contribution could exceed max_grad_norm. Compute no "
                    "gradient inside loss_fn; return the per-sample losses only")
            if param is not None:
                self._deferred_ids.add(id(param))
        self.add_sq_norms(sq_B)
        self._deferred.append((module, params, clipped_sums))

    def flat_pass(self, norms_pass: Callable[[Callable], torch.Tensor],
                  call_model: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Flat clipping in one forward and one backward, inside one call of the whole model.

        ``call_model(token)`` (the DeepSpeed engine, so that its forward and backward book-keeping run as
        for any micro-batch; the model itself by default) calls the model once, with, for that call
        only, this forward:
          1. ``norms_pass(model_forward) -> factors``: the model's own forward in BOOKKEEP mode and its
             backward (every layer adds its per-sample norms and keeps its input and output gradient;
             no weight gradient), then the whole-sample clip factors;
          2. each kept layer's module called once on the token in HAND_OVER mode, which returns a zero
             scalar whose backward gives the layer's parameters their clipped sums (computed there, one
             layer at a time).
        The sum of those scalars is returned; its backward (engine.backward) delivers the sums. Hooks on
        the modules run as in any use of the layers: ZeRO 3 gathers a layer's weights around each of
        its backwards, and every stage's reduction hooks take the sums; being one model call per
        micro-batch, ZeRO 3's module trace is the same at every step. The token requires grad so that
        the hooks' release after each module's backward runs."""
        if self.mode is not ClipMode.BOOKKEEP:
            raise RuntimeError("flat_pass runs inside pass_mode(ClipMode.BOOKKEEP)")
        root = self.model
        own_forward = root.__dict__.get("forward")  # e.g. the root's DP forward if it is a DP layer itself

        model_forward = _InnerForward(root, own_forward)

        def forward_once(token: torch.Tensor, *_, **__) -> torch.Tensor:
            factors_B = norms_pass(model_forward).detach()
            return self._hand_over(factors_B, token, own_forward)

        token = torch.zeros((), dtype=torch.float32, device=_device_of(root)).requires_grad_()
        root.forward = forward_once  # an instance attribute for this one call, removed below
        try:
            return (call_model or root)(token)
        finally:
            self.mode = ClipMode.BOOKKEEP  # pass_mode's exit clears what is left of the hand-over
            if own_forward is None:
                del root.forward
            else:
                root.forward = own_forward

    def _hand_over(self, factors_B: torch.Tensor, token: torch.Tensor, own_forward) -> torch.Tensor:
        """Call each kept layer once in HAND_OVER mode. A layer whose call does not reach its DP forward
        keeps its sums here; check_handed_over's count refuses the step after the backward."""
        deferred, self._deferred = self._deferred, []
        self._handing = {}
        self._handed_expected, self._handed, self._scale_error = len(deferred), 0, None
        for module, params, clipped_sums in deferred:
            if id(module) in self._handing:  # defer() refuses repeated parameters; a module twice is one too
                raise ReusedLayerError("a DP layer kept two clipped sums in one flat-clipping pass")
            self._handing[id(module)] = (params, lambda fn=clipped_sums: fn(factors_B))
        total = token.new_zeros(())
        self.mode = ClipMode.HAND_OVER
        for module, _, _ in deferred:
            # The root is being called already (its hooks ran): its own DP forward, not a second call.
            total = total + (own_forward(token) if module is self.model else module(token))
        self.mode = ClipMode.BOOKKEEP
        return total

    def note_handed(self, scale: torch.Tensor) -> None:
        """From a hand-over backward: one layer's sums returned, under incoming gradient ``scale``."""
        self._handed += 1
        error = (scale.detach().float() - 1).abs()
        self._scale_error = error if self._scale_error is None else torch.maximum(self._scale_error, error)

    def check_handed_over(self) -> None:
        """After the backward of ``flat_pass``'s scalar: every kept layer's sums reached its parameters,
        each under an incoming gradient of exactly 1 (DeepSpeed applies no loss scale in fp32/bf16 and
        its accumulation steps are 1). A forward hook on the model or on a layer also runs on the
        hand-over call; one that scales its output would scale clipped sums past C, one that detaches
        or replaces it would drop them. One host sync."""
        missing = self._handed_expected - self._handed
        scaled = self._scale_error is not None and bool(self._scale_error != 0)
        if missing or scaled:
            what = (f"the clipped sums of {missing} of {self._handed_expected} layers never reached their parameters"
                    if missing else "the clipped sums were scaled on their way to the parameters")
            raise AlteredHandOverError(
                f"flat clipping: {what}. Flat clipping hands each layer's clipped sum over through one more call of the "
                "model and of each layer (on a 0-d token), and a forward hook on the model or on a layer that scales, "
                "replaces or detaches the output altered it, which would break the max_grad_norm bound. Remove such "
                "forward hooks, or use privacy.clipping=per_layer")

    def take_hand_over(self, module: nn.Module) -> tuple[tuple, Callable[[], tuple]]:
        """HAND_OVER, from the module's DP forward: its parameters and the function of its clipped sums."""
        if id(module) not in self._handing:
            raise ReusedLayerError("a DP layer was called twice while the clipped sums were handed over")
        return self._handing.pop(id(module))

    def layer_factors(self, sq_B: torch.Tensor, grad_dtype: torch.dtype) -> torch.Tensor:
        """Clip factors min(1, C_l' / ||g_i,l||) for one layer, in at least float32; records norms
        for statistics. ``grad_dtype`` is the dtype the clipped sum is cast to (the parameter's)."""
        self.add_sq_norms(sq_B)
        norms = sq_B.sqrt()  # float32 at least: per_sample upcasts
        finite = torch.isfinite(sq_B)
        clipped = (norms > self.layer_threshold) | ~finite
        self.clipped = clipped if self.clipped is None else (self.clipped | clipped)
        threshold = self.layer_threshold * (1 - _rounding_margin(grad_dtype))
        return _finite_factors((threshold / (norms + 1e-6)).clamp(max=1.0), finite)

    def flat_factors(self, sq_B: torch.Tensor) -> torch.Tensor:
        """Clip factors min(1, C' / ||g_i||) from the whole per-sample norm (flat clipping), in at least
        float32. C' is C less the rounding margin of the lowest-precision trainable parameter: each
        layer's clipped sum is cast to its parameter's dtype, which rounds every layer's share, hence
        the whole norm, by at most that dtype's unit roundoff."""
        norms = sq_B.sqrt()
        finite = torch.isfinite(sq_B)
        self.clipped = (norms > self.max_grad_norm) | ~finite
        margin = max(_rounding_margin(p.dtype) for layer in self.layers for _, p in _own_trainable(layer.module))
        threshold = self.max_grad_norm * (1 - margin)
        return _finite_factors((threshold / (norms + 1e-6)).clamp(max=1.0), finite)

    def check_batch_dim(self, module: nn.Module, x: torch.Tensor, what: str = "input") -> None:
        """Refuse a DP layer applied to a tensor whose first dimension is not the micro-batch (a
        (B*T, D) reshape, a (1, T, D) tensor shared by the batch): its rows are not samples, so it
        would clip per row, and a sample's gradient could exceed C_l. Shapes only: no host sync."""
        if x.dim() >= 1 and x.shape[0] == self.batch_size:
            return
        layer = self.layer_by_module.get(id(module))
        name = (layer.name or "<root>") if layer is not None else type(module).__name__
        raise BatchDimError(
            f"the DP layer {name} ({type(module).__module__}.{type(module).__qualname__}) got an {what} of shape "
            f"{tuple(x.shape)} whose first dimension is not the micro-batch size {self.batch_size}: a layer applied to "
            "a tensor whose first dimension is not the batch (e.g. (B*T, D), or a (1, T, D) tensor shared by the batch) "
            "would clip per row instead of per sample. Keep the batch dimension first (reshape to (B, T, D)), or "
            "freeze the layer (requires_grad=False)")

    def method_summary(self) -> dict[str, dict]:
        return {layer.name: dict(layer.methods) for layer in self.layers}


class _InnerForward:
    """The model's own forward, for use inside a call of the model already under way (hooks on the
    model already ran; calling the model again would run them twice, and at ZeRO 3 restart its
    module trace). Otherwise it stands for the model: loss functions may read its attributes."""

    def __init__(self, model: nn.Module, own_forward):
        self._model, self._own_forward = model, own_forward

    def __call__(self, *args, **kwargs):
        if self._own_forward is not None:
            return self._own_forward(*args, **kwargs)
        return type(self._model).forward(self._model, *args, **kwargs)

    def forward(self, *args, **kwargs):  # not the model's temporary forward (that would recurse)
        return self(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's tensors live (a ZeRO-3 partition placeholder still has its device)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _refuse_hub_kernels(model: nn.Module) -> None:
    """A transformers model loaded with use_kernels=True (5.25's default when the `kernels` package
    is installed) replaces layer forwards on every train()/eval() mode change, the DP forwards
    included: refused before anything runs (check_attached would refuse it at the first pass)."""
    kernelized = [name or "<root>" for name, m in model.named_modules() if getattr(m, "use_kernels", False) is True]
    if kernelized:
        raise DetachedLayerError(
            f"the model ({kernelized[0]}) was loaded with hub kernels on (use_kernels=True, transformers' default "
            "when the `kernels` package is installed): they replace layer forwards, the DP layers' included, whenever "
            "the model switches between train() and eval(). Load it with from_pretrained(..., use_kernels=False) "
            "(dist-dpc's loaders do) or set USE_HUB_KERNELS=0 before loading")


def _finite_factors(factors_B: torch.Tensor, finite_B: torch.Tensor) -> torch.Tensor:
    """A sample whose squared norm is NaN or inf gets factor 0 (clamp(max=1) lets NaN through): it
    is dropped from the clipped sum instead of poisoning it. The clipped-sum functions also zero its
    rows, since 0 * inf is NaN. torch.where: no host sync."""
    return torch.where(finite_B, factors_B, torch.zeros_like(factors_B))


def _rounding_margin(grad_dtype: torch.dtype) -> float:
    """Relative margin under the threshold so that casting the clipped sum to ``grad_dtype`` cannot
    lift a sample's contribution above C_l: the cast rounds each coordinate, hence the norm, by at
    most the unit roundoff (2^-8 for bf16, 2^-11 for fp16); 2^-7 also covers float32 error in the
    norm. For a batch of one the cast sum is the sample's contribution itself."""
    return 2.0 ** -7 if grad_dtype in (torch.float16, torch.bfloat16) else 0.0


class _BoundDPForward:
    """module.forward replacement: the DP forward while a DP pass runs, else the class forward."""

    def __init__(self, fn: DPForward, module: nn.Module, clipper: PerSampleClipper):
        self.fn, self.clipper = fn, clipper
        self.module_ref = module  # a strong ref is fine: module owns this object

    def __call__(self, *args, **kwargs):
        if self.clipper.mode is ClipMode.OFF:
            return type(self.module_ref).forward(self.module_ref, *args, **kwargs)
        if self.clipper.mode is ClipMode.HAND_OVER:
            params, clipped_sums = self.clipper.take_hand_over(self.module_ref)
            return _HandOverSums.apply(args[0], clipped_sums, self.clipper, *params)
        self.clipper.record_call(self.module_ref)
        return self.fn(self.module_ref, self.clipper, *args, **kwargs)


class _HandOverSums(torch.autograd.Function):
    """HAND_OVER: a zero scalar whose backward returns a layer's clipped sums as its parameters'
    gradients, computed there (one layer's sums alive at a time). The forward never reads the
    parameters; they are inputs so that autograd routes the sums to them (and to their hooks). The
    incoming gradient must be exactly 1 (no loss scale, one accumulation step): the clipper records it
    and check_handed_over refuses the step otherwise. The sums are returned as computed, never
    multiplied by it: a hook that scales the call's output cannot scale them, and no pass over every
    gradient is spent multiplying by 1."""

    @staticmethod
    def forward(ctx, token, clipped_sums, clipper, *params):
        ctx.clipped_sums, ctx.clipper = clipped_sums, clipper
        return token.new_zeros(())

    @staticmethod
    def backward(ctx, scale):
        clipped_sums, ctx.clipped_sums = ctx.clipped_sums, None  # what the layer kept is freed with its sums
        ctx.clipper.note_handed(scale)  # must be exactly 1: check_handed_over
        return (torch.zeros_like(scale), None, None, *clipped_sums())  # one per param


def check_no_bypass(clipper: PerSampleClipper, model: nn.Module, summed_loss: Callable[[], torch.Tensor],
                    batch_size: int) -> None:
    """Start-up self-test: refuse a trainable parameter whose gradient does not come from a DP layer.

    Exact-type rules say nothing about how a weight is *used*: nn.MultiheadAttention reads
    out_proj.weight directly, a parent may read a child's weight. In NORMS mode the DP layers return
    no weight gradients, so after one norms-only backward any trainable parameter with a gradient
    got it outside them, unclipped. ``summed_loss()`` runs the forward (in NORMS mode) and returns
    the scalar loss. ``torch.autograd.grad`` neither touches ``.grad`` nor fires accumulation hooks,
    and under ZeRO-3 it still returns a (full-shape) gradient for a partitioned parameter.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    methods = [dict(layer.methods) for layer in clipper.layers]  # this pass is not part of the report
    with clipper.pass_mode(ClipMode.NORMS, batch_size):
        grads = torch.autograd.grad(summed_loss(), [p for _, p in named], allow_unused=True)
    for layer, counts in zip(clipper.layers, methods):
        layer.methods = counts
    bypassed = [n for (n, _), g in zip(named, grads) if g is not None]
    if bypassed:
        raise BypassedLayerError(
            f"these trainable parameters get gradients outside the DP layers, which would not be clipped: "
            f"{', '.join(bypassed)}. Their module's forward is bypassed (e.g. nn.MultiheadAttention reads "
            "out_proj.weight directly, or a parent module reads a child's weight). Freeze them "
            "(requires_grad=False) or replace the module by one whose forward uses its own weights")


def gradient_hooks(model: nn.Module) -> dict[str, tuple]:
    """Trainable parameter name -> the hooks on its gradient (the callables), for parameters with any.

    Hooks registered with ``Tensor.register_hook`` run on a parameter's gradient before it is
    accumulated, ``register_post_accumulate_grad_hook`` ones after; both see the clipped sum before
    the noise and could scale it (or add to it) beyond max_grad_norm. DeepSpeed's own reduction
    hooks are of the second kind. torch keeps them in the private ``Tensor._backward_hooks`` and
    ``Tensor._post_accumulate_grad_hooks``; with ``global_optimizer_pre_hooks`` this is the one place
    that reads torch's hook registries, and tests/engine/test_gradient_hooks.py fails if a torch
    version moves them. The callables themselves, compared by identity: an id() could be reused by a
    new hook once an old one is freed."""
    hooks = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        found = tuple(fn for store in (getattr(p, "_backward_hooks", None), getattr(p, "_post_accumulate_grad_hooks", None))
                      if store for fn in store.values())
        if found:
            hooks[name] = found
    return hooks


def global_optimizer_pre_hooks() -> tuple:
    """Hooks registered with torch.optim.optimizer.register_optimizer_step_pre_hook: they run before
    every optimizer's own pre-hooks, the engine's noise hook included, so they see the clipped sum
    before the noise (torch keeps them in the private ``_global_optimizer_pre_hooks``)."""
    from torch.optim import optimizer

    return tuple(getattr(optimizer, "_global_optimizer_pre_hooks", {}).values())


def refuse_gradient_hooks(model: nn.Module, allowed: dict[str, tuple] | None = None) -> None:
    """Refuse hooks on trainable parameters' gradients other than ``allowed`` (DeepSpeed's, recorded
    right after deepspeed.initialize; before it, none is allowed), and global optimizer pre-hooks."""
    allowed = allowed or {}
    added = sorted(name for name, fns in gradient_hooks(model).items()
                   if len(fns) != len(allowed.get(name, ())) or any(a is not b for a, b in zip(fns, allowed[name])))
    if added:
        raise GradientHookError(
            f"{len(added)} trainable parameter(s) ({', '.join(added[:5])}{', ...' if len(added) > 5 else ''}) have a hook "
            "on their gradient (Tensor.register_hook or register_post_accumulate_grad_hook) other than DeepSpeed's own "
            "for this engine (a hook of yours, or of an earlier engine built on the same model): it would run on the "
            "clipped gradient sum before the noise and could scale it, or add to it, beyond max_grad_norm. Remove the "
            "hook (or build the model anew); to transform the gradient, do it after the noise (an optimizer step "
            "pre-hook registered on the engine's optimizer, or engine.post_noise_hooks)")
    if global_optimizer_pre_hooks():
        raise GradientHookError(
            "a global optimizer step pre-hook is registered (torch.optim.optimizer.register_optimizer_step_pre_hook): "
            "it runs before the engine's noise hook, on the clipped gradient sum before the noise, and could scale it "
            "beyond max_grad_norm. Remove it; register a pre-hook on the engine's optimizer instead, which runs after "
            "the noise")


def record_method(clipper: PerSampleClipper, module: nn.Module, method: str) -> None:
    """Count which norm method each layer used (ghost or direct), for the run's report."""
    layer = clipper.layer_by_module[id(module)]
    layer.methods[method] = layer.methods.get(method, 0) + 1
