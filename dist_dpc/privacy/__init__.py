"""Per-sample norms, clipping, noise, sampling and privacy accounting (torch + opacus only)."""

from dist_dpc.privacy import layers  # noqa: F401  (registers the built-in DP layers)
from dist_dpc.privacy.clipper import (
    BatchDimError,
    BatchMixingLayerError,
    BypassedLayerError,
    ClipMode,
    AlteredHandOverError,
    DetachedLayerError,
    GradientHookError,
    PerSampleClipper,
    ReusedLayerError,
    TiedWeightsError,
    UnsupportedLayerError,
    check_no_bypass,
    find_dp_layers,
    register_dp_layer,
)
from dist_dpc.privacy.config import PrivacyConfig

__all__ = [
    "BatchDimError",
    "BatchMixingLayerError",
    "BypassedLayerError",
    "ClipMode",
    "AlteredHandOverError",
    "DetachedLayerError",
    "GradientHookError",
    "PerSampleClipper",
    "PrivacyConfig",
    "ReusedLayerError",
    "TiedWeightsError",
    "UnsupportedLayerError",
    "check_no_bypass",
    "find_dp_layers",
    "register_dp_layer",
]
