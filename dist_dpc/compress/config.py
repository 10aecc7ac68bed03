"""Settings of the compression phases (DPKD, DPIMP); sections `distill` and `prune` of the run config."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

# DP-BiTFiT (Bu et al., 2022): biases, normalisation layers and the head train, the weight matrices
# stay as the source model left them. The compression phases' default: under it DPKD and DPIMP met
# the paper's gaps (docs/RESULTS.md), and it is what makes a DP-LoRA teacher's merged student
# trainable without adapters. Names of BERT (LayerNorm, pooler, classifier), GPT-2 (ln_, score) and
# Llama (norm, score) classifiers.
BITFIT = ["bias", "LayerNorm", "norm", "ln_", "pooler", "classifier", "score"]
COMPRESSION_LR = 1e-3
# The DPKD student's default: all of its weights (model.freeze_embeddings keeps the embeddings out).
# A student cut from the teacher sees other features than the teacher's head was fitted to; with
# DP-BiTFiT it stayed at chance on small sets (docs/RESULTS.md, issue 13).
STUDENT_ALL = [r"^(?!lm_head\.)"]  # every parameter but an untied LM head (a vocab x width matrix under DP)


def _check_phase_schedule(section: str, epochs: float | None, lr: float | None,
                          trainable: list[str] | None) -> None:
    """The per-phase overrides of train.epochs, train.lr (positive, or null for the train value) and
    model.trainable (regular expressions, or null)."""
    for key, value in (("epochs", epochs), ("lr", lr)):
        if value is not None and value <= 0:
            raise ValueError(f"{section}.{key}={value!r} is invalid: must be > 0 or null")
    for pattern in trainable or []:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{section}.trainable: {pattern!r} is not a regular expression ({exc})") from exc



@dataclass(kw_only=True)
class DistillConfig:
    student: str = "from_teacher"
    """from_teacher: the teacher with only the layers of layer_map (default every other one, the last
    one kept); or a model name/directory of a smaller pre-trained model with the same tokenizer."""
    layer_map: list[int] | None = None
    """Teacher layers the student keeps (null: every other one counted back from the last: 1, 3, 5 of
    a 6-layer teacher, 0, 2, 4, 6 of a 7-layer one)."""
    alpha: float = 0.5
    """Weight of the distillation term: (1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher_T || student_T).
    alpha=0 trains the same student with DP-SGD alone (the no-KD baseline)."""
    temperature: float = 2.0
    """Softmax temperature T of the distillation term."""
    hidden_weight: float = 0.0
    """Weight of the hidden-state MSE between student layer i and teacher layer layer_map[i] (0: off)."""
    teacher: str | None = None
    """Directory of the DP teacher (null: this run's teacher phase). A teacher from another run tree
    brings its privacy cost: its ledger's mechanisms are imported into this run's ledger."""
    epochs: float | None = None
    """Training epochs of this phase (null: train.epochs)."""
    lr: float | None = COMPRESSION_LR
    """Learning rate of this phase (null: train.lr)."""
    trainable: list[str] | None = field(default_factory=lambda: list(STUDENT_ALL))
    """Regular expressions of the student's parameters that train (default: every weight of the
    student but an untied LM head (`^(?!lm_head\\.)`), its embeddings frozen by model.freeze_embeddings: full DP fine-tuning of a half-depth
    model, which DP-BiTFiT (bias, LayerNorm, pooler, classifier) could not adapt: docs/RESULTS.md; null:
    model.trainable). Required with model.lora: the student is a plain model (the teacher's layers,
    its adapters merged), so this phase says what it trains."""

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"distill.alpha={self.alpha!r} is invalid: must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature={self.temperature!r} is invalid: must be > 0")
        if self.hidden_weight < 0:
            raise ValueError(f"distill.hidden_weight={self.hidden_weight!r} is invalid: must be >= 0")
        _check_phase_schedule("distill", self.epochs, self.lr, self.trainable)


@dataclass(kw_only=True)
class PruneConfig:
    method: Literal["unstructured", "structured", "2:4"] = "unstructured"
    """unstructured: global magnitude pruning of the transformer blocks' weight matrices (Alg. 3);
    structured: removal of whole transformer layers by mean |w| (Alg. 2); 2:4: two of every four
    consecutive weights kept by magnitude."""
    target_sparsity: float = 0.5
    """unstructured: fraction of the prunable weights set to zero after the last round."""
    target_layers: int | None = None
    """structured: transformer layers left after the last round (null: half, rounded up)."""
    keep_last_layer: bool = True
    """structured: never remove the last transformer layer (the one the head reads); the other
    layers are ranked by mean |w|. false ranks every layer, the last one included."""
    rounds: int = 3
    """Prune-then-DP-fine-tune rounds; sparsity (or depth) moves evenly to its target."""
    source: str = "auto"
    """Phase whose model is pruned: teacher, distill, or auto (the last model-producing phase listed
    before prune in pipeline.phases); or a model directory (its run's ledger is imported)."""
    epochs: float | None = None
    """Total DP fine-tuning epochs over all rounds (null: train.epochs)."""
    lr: float | None = COMPRESSION_LR
    """Learning rate of this phase (null: train.lr)."""
    trainable: list[str] | None = field(default_factory=lambda: list(BITFIT))
    """Regular expressions of the pruned model's parameters that train between rounds (default
    DP-BiTFiT, as distill.trainable; null: model.trainable). Required with model.lora: pruning masks the model's own weights (the source's
    adapters are merged into them), so this phase says what it trains."""

    def __post_init__(self) -> None:
        if not 0 <= self.target_sparsity < 1:
            raise ValueError(f"prune.target_sparsity={self.target_sparsity!r} is invalid: must be in [0, 1)")
        if self.target_layers is not None and self.target_layers < 1:
            raise ValueError(f"prune.target_layers={self.target_layers!r} is invalid: must be >= 1 or null")
        if self.rounds < 1:
            raise ValueError(f"prune.rounds={self.rounds!r} is invalid: must be >= 1")
        _check_phase_schedule("prune", self.epochs, self.lr, self.trainable)


@dataclass(kw_only=True)
class DistillSyntheticConfig:
    """Phase distill_synthetic (Flemings & Annavaram 2024): a causal-LM student trained WITHOUT DP-SGD on
    the DP teacher's synthetic text only, with the teacher's token distributions. Reads no private
    data: post-processing of the DP teacher and of DP-generated text, so it spends nothing."""
    samples: str = "auto"
    """The synthetic set: auto (this tree's generate/samples.jsonl) or the samples.jsonl of a generate
    run (its summary.json must show a DP source; private data is refused)."""
    student: str = "from_teacher"
    """from_teacher: the teacher with only the layers of layer_map (default every other one, the last
    one kept); or a smaller causal LM (directory or hub name) with the teacher's tokenizer."""
    layer_map: list[int] | None = None
    """Teacher layers a from_teacher student keeps (null: every other one counted back from the last:
    1, 3, ..., 29 of a 30-layer teacher)."""
    kd_weight: float = 0.4
    """lambda: loss = (1 - lambda) * CE(synthetic tokens) + lambda * T^2 * KL(teacher_T || student_T) per
    text token (+ hidden_weight * MSE); 0 trains on the synthetic text alone (the no-KD baseline)."""
    temperature: float = 1.0
    """Softmax temperature T of the KL term."""
    hidden_weight: float = 0.0
    """beta: weight of the MSE between the student's and the teacher's last hidden states (text tokens),
    through a learned linear projection when their widths differ (0: off, as in the paper's runs)."""
    epochs: float = 14.0
    """Passes over the synthetic training part (early stopping may end sooner)."""
    lr: float = 8e-5
    """AdamW learning rate (constant)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    batch_size: int = 16
    """Synthetic samples per step (no privacy: plain mini-batches)."""
    holdout_fraction: float = 0.01
    """Part of the synthetic set held out for early stopping (it reads no private data)."""
    eval_every: int = 50
    """Steps between held-out evaluations (and the end of each epoch)."""
    patience: int = 3
    """Evaluations without a better held-out loss before training stops; the best model is kept."""

    def __post_init__(self) -> None:
        if not 0 <= self.kd_weight <= 1:
            raise ValueError(f"distill_synthetic.kd_weight={self.kd_weight!r} is invalid: must be in [0, 1]")
        for key in ("temperature", "epochs", "lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"distill_synthetic.{key}={getattr(self, key)!r} is invalid: must be > 0")
        if self.hidden_weight < 0 or self.weight_decay < 0:
            raise ValueError("distill_synthetic.hidden_weight and distill_synthetic.weight_decay must be >= 0")
        for key in ("batch_size", "eval_every", "patience"):
            if getattr(self, key) < 1:
                raise ValueError(f"distill_synthetic.{key}={getattr(self, key)!r} is invalid: must be >= 1")
        if not 0 < self.holdout_fraction < 0.5:
            raise ValueError(f"distill_synthetic.holdout_fraction={self.holdout_fraction!r} is invalid: must be in "
                             "(0, 0.5)")

