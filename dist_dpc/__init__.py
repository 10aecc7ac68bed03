"""dist-dpc: differentially private fine-tuning and compression under DeepSpeed.

For a user's own DeepSpeed loop: ``dist_dpc.initialize`` (dist_dpc/pipeline/api.py) with a
``dist_dpc.PrivacyConfig``; for the HF Trainer: ``dist_dpc.DPTrainer``. Loaded on first use, so
that ``import dist_dpc`` (and every ``dpc`` start) stays cheap.
"""

_EXPORTS = {"initialize": "dist_dpc.pipeline.api", "PrivacyConfig": "dist_dpc.privacy.config",
            "DPTrainer": "dist_dpc.pipeline.hf_trainer"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dist_dpc' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
