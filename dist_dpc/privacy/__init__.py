"""Per-sample norms, clipping, noise, sampling and privacy accounting (torch + opacus only)."""

from dist_dpc.privacy import layers  # noqa: F401  (registers the built-in DP layers)
from dist_dpc.privacy.clipper import (
    ClipMode,
    PerSampleClipper,
    TiedWeightsError,
    UnsupportedLayerError,
    find_dp_layers,
    register_dp_layer,
)
from dist_dpc.privacy.config import PrivacyConfig

__all__ = [
    "ClipMode",
    "PerSampleClipper",
    "PrivacyConfig",
    "TiedWeightsError",
    "UnsupportedLayerError",
    "find_dp_layers",
    "register_dp_layer",
]
