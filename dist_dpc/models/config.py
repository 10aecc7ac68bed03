"""Which model to fine-tune."""

from __future__ import annotations

from dataclasses import dataclass

TASK_KINDS = ("sequence_classification", "causal_lm")


@dataclass(kw_only=True)
class LoraSettings:
    """DP-LoRA through peft (Hu et al. 2022; under DP: Yu et al., ICLR 2022): the pre-trained weights
    stay frozen and low-rank adapters train, so far fewer coordinates carry noise."""
    r: int = 8
    """Rank of the adapters."""
    alpha: float = 16.0
    """Scaling numerator: the adapters' output is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: list[str] | None = None
    """Module names (or suffixes) that get adapters; null: peft's default for the architecture (the
    attention query and value projections)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"model.lora.r={self.r!r} is invalid: must be >= 1")
        if not self.alpha > 0:
            raise ValueError(f"model.lora.alpha={self.alpha!r} is invalid: must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout={self.dropout!r} is invalid: must be in [0, 1)")


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "minilm"
    """An alias (minilm, smollm2), a local directory, a Hugging Face hub name, a .gguf file (converted
    once to a safetensors checkpoint in a cache), or a debug model built from a config (tiny-bert,
    tiny-gpt2, tiny-llama)."""
    task: str = "sequence_classification"
    """What the model learns: sequence_classification (a classifier head on the text, data labels) or
    causal_lm (next-token prediction on the text; control codes, if any, condition but carry no loss)."""
    tokenizer: str | None = None
    """Tokenizer to load, if not the model's own. Debug models default to the minilm tokenizer
    (classification) or a byte-level tokenizer of 257 tokens (causal_lm)."""
    num_labels: int | None = None
    """Classifier outputs. null: the number of labels of the task."""
    freeze_embeddings: bool = False
    """Freeze the embedding layers (fewer trainable parameters under DP)."""
    trainable: list[str] | None = None
    """Regular expressions: only parameters whose name matches one of them are trained (null: all).
    Fewer trainable coordinates means less total noise under DP, e.g. DP-BiTFiT with
    [bias, LayerNorm, classifier, pooler]. Unmatched parameters are frozen, never noised."""
    dropout: float | None = 0.0
    """Dropout probability set on every dropout of the model (hidden, attention, classifier). 0 (the
    default since 2026-12-05): dropout off. DP-SGD's noise already regularises, and on the validation
    splits of docs/RESULTS.md the DP teacher scored as well or better without dropout (3 of 4 tasks
    better, by 1.4-2.0 points) while each step ran about a fifth faster. null keeps the pre-trained
    value (MiniLM, BERT: 0.1), as `from_pretrained` does."""
    lora: LoraSettings | None = None
    """DP-LoRA, e.g. {r: 8, alpha: 16}: adapters train, the pre-trained weights are frozen; a
    classifier's head (parameters matching model.trainable, default classifier and pooler) trains
    too (a causal LM's head does not, unless model.trainable names it). Saved models are merged (a
    plain Hugging Face directory). null: no adapters."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model.name='' is invalid: give an alias (minilm, tiny-bert, tiny-gpt2, tiny-llama), a directory or a hub name")
        if self.task not in TASK_KINDS:
            raise ValueError(f"model.task={self.task!r} is invalid: allowed values are {', '.join(TASK_KINDS)}")
        if self.num_labels is not None and self.num_labels < 1:
            raise ValueError(f"model.num_labels={self.num_labels!r} is invalid: must be >= 1")
        if self.trainable is not None:
            import re

            for pattern in self.trainable:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"model.trainable: {pattern!r} is not a regular expression ({exc})") from exc
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout={self.dropout!r} is invalid: must be in [0, 1)")
