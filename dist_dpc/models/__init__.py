"""Model builders: aliases, HF names or directories, debug-size models, and their DP layer rules."""

from dist_dpc.models import dp_layers  # noqa: F401  (registers GPT-2 Conv1D and Llama RMSNorm rules)
from dist_dpc.models.config import ModelConfig
from dist_dpc.models.loading import DEBUG_MODELS, load_causal_lm, load_sequence_classifier, load_tokenizer, resolve_name

__all__ = ["DEBUG_MODELS", "ModelConfig", "load_causal_lm", "load_sequence_classifier", "load_tokenizer", "resolve_name"]
