"""DP forwards of the built-in layer types; importing this package registers them."""

from dist_dpc.privacy.layers import embedding, linear, norm_affine  # noqa: F401
