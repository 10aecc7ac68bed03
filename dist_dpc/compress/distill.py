"""DP knowledge distillation (Mireshghallah et al. 2022, Alg. 1): the loss and the student's initialisation.

The student is trained with DP-SGD on the private data; the frozen DP teacher's logits on each sample
enter that sample's loss, which is still a per-sample loss, so the DP step clips it like any other.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def kd_mix(ce: torch.Tensor, kl: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """The KD objective from its terms: (1 - alpha) * CE + alpha * T^2 * KL (Hinton et al.'s T^2 keeps
    the soft term's gradient scale independent of T)."""
    if alpha == 0:  # the soft term is absent, not multiplied by 0 (0 * inf would be NaN)
        return ce
    if alpha == 1:
        return temperature ** 2 * kl
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
            temperature: float) -> torch.Tensor:
    """Per-sample (1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher_T || student_T), shape (B,)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"distill.alpha={alpha!r} is invalid: must be in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"distill.temperature={temperature!r} is invalid: must be > 0")
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    ce = F.cross_entropy(student_logits, labels, reduction="none")
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return kd_mix(ce, kl, alpha, temperature)


def token_ce_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token terms of a causal LM, position t predicting labels[t + 1], each of shape (B, L - 1):
    the student's CE, KL(teacher_T || student_T), and the mask of the positions that count (labels
    not -100: the text and its EOS; never padding or control codes). CE and KL are not masked."""
    s = student_logits[:, :-1].float()
    t = teacher_logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    ce = F.cross_entropy(s.transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none")
    log_p_teacher = F.log_softmax(t / temperature, dim=-1)
    log_p_student = F.log_softmax(s / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return ce, kl, mask


def token_kd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token KD of a causal LM (token_ce_kl). Returns the per-token loss
    (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T), shape (B, L - 1), zero where the mask
    is False, and the mask."""
    ce, kl, mask = token_ce_kl(student_logits, teacher_logits, labels, temperature)
    return kd_mix(ce, kl, alpha, temperature) * mask, mask


def token_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                  temperature: float) -> torch.Tensor:
    """Per-sample token KD, shape (B,): each sample's mean over its counted positions (the DP unit
    is the sample, as in causal_lm_loss; a sample with none has loss 0)."""
    per_token, mask = token_kd_terms(student_logits, teacher_logits, labels, alpha, temperature)
    return per_token.sum(1) / mask.sum(1).clamp(min=1)


def every_other_layer(num_layers: int) -> list[int]:
    """The default layer map: every other teacher layer counted back from the last one (1, 3, 5 of 6
    layers; 0, 2, 4, 6 of 7): half the depth, rounded up. The last layer stays because the head (the
    pooler and classifier, or the final norm and LM head) was trained on its outputs, as
    structured pruning keeps it (prune.keep_last_layer) and as PKD-skip (Sun et al., EMNLP 2019)
    picks its layers. Measured against 0, 2, 4 on SST-2 sentences carved from its training file
    (bench/sst2_val.py, docs/RESULTS.md): +1.5 and +1.7 points over two 0, 2, 4 students."""
    return list(range(num_layers - 1, -1, -2))[::-1]


def transformer_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """The ModuleList of transformer blocks and the config attribute counting them."""
    for path, count in (("bert.encoder.layer", "num_hidden_layers"), ("roberta.encoder.layer", "num_hidden_layers"),
                        ("transformer.h", "n_layer"), ("model.layers", "num_hidden_layers")):
        node = model
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        if isinstance(node, nn.ModuleList):
            return node, count
    raise ValueError(f"{type(model).__name__}: no known stack of transformer layers (BERT, RoBERTa, GPT-2, Llama)")


def student_from_teacher(teacher: nn.Module, layer_map: list[int] | None = None) -> nn.Module:
    """A shallower copy of ``teacher`` keeping the layers in ``layer_map`` (embeddings, pooler and
    classifier copied too). Copying DP weights is post-processing: it costs no privacy."""
    layers, count_attr = transformer_layers(teacher)
    layer_map = every_other_layer(len(layers)) if layer_map is None else list(layer_map)
    if not layer_map or any(not 0 <= i < len(layers) for i in layer_map):
        raise ValueError(f"distill.layer_map={layer_map} is invalid: indices must be in [0, {len(layers)})")
    student = copy.deepcopy(teacher)
    kept, _ = transformer_layers(student)
    new = nn.ModuleList([kept[i] for i in layer_map])
    _set_layers(student, new)
    setattr(student.config, count_attr, len(layer_map))
    if hasattr(student.config, "layer_types") and isinstance(getattr(student.config, "layer_types"), list):
        student.config.layer_types = [student.config.layer_types[i] for i in layer_map]
    for i, layer in enumerate(new):  # attention caches index layers by position
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    return student


def _set_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    for path in ("bert.encoder.layer", "roberta.encoder.layer", "transformer.h", "model.layers"):
        *parents, leaf = path.split(".")
        node = model
        try:
            for part in parents:
                node = getattr(node, part)
            if isinstance(getattr(node, leaf), nn.ModuleList):
                setattr(node, leaf, layers)
                return
        except AttributeError:
            continue
    raise ValueError("no transformer layer stack to replace")


class DistillationLoss:
    """Per-sample DPKD loss for the DP engine: ``loss(forward, batch) -> (B,)``.

    The teacher's logits come from ``teacher_logits``, a table of every training example's (N, C) in
    dataset order, looked up by the micro-batch's ``example_index`` (the trainer adds it): the frozen
    teacher's output on an example never changes, so one pass over the data replaces a teacher
    forward in every step (on SST-2's DPKD phase about a quarter of the step). Without a table (causal
    LMs: a vocabulary of logits per token) the teacher runs on each micro-batch, its outputs cached
    per micro-batch because the engine's first step calls the loss twice on it (its self-test).
    Either way sample i's loss reads only sample i's teacher output; padding rows read a constant.
    With ``hidden_weight`` > 0 the student's hidden states also regress onto the teacher's layers
    named by ``layer_map`` (mean squared error over real tokens; hidden sizes must match, as with a
    student cut from the teacher), so the teacher runs each step. With alpha 0 and no hidden term
    the teacher is not used at all.
    """

    def __init__(self, teacher: nn.Module, *, alpha: float, temperature: float, hidden_weight: float = 0.0,
                 layer_map: list[int] | None = None, input_keys=("input_ids", "attention_mask", "token_type_ids"),
                 token_level: bool = False, teacher_logits: torch.Tensor | None = None):
        if hidden_weight < 0:
            raise ValueError(f"distill.hidden_weight={hidden_weight!r} is invalid: must be >= 0")
        if hidden_weight > 0 and layer_map is None:
            raise ValueError("distill.hidden_weight > 0 needs the student's layer map (a student cut from the teacher)")
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), alpha, temperature)  # validates
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature, self.hidden_weight = alpha, temperature, hidden_weight
        self.layer_map = layer_map
        self.input_keys = input_keys
        self.token_level = token_level
        self._cache: tuple[torch.Tensor, object] | None = None
        self.use_teacher_logits(teacher_logits)

    def use_teacher_logits(self, table: torch.Tensor | None) -> None:
        """Read the teacher's logits from ``table`` (N, C) from now on and drop the teacher; None: run
        the teacher (unless the loss does not read it: alpha 0 without a hidden term). Ignored with
        hidden_weight > 0, where the teacher runs each step for its hidden states anyway."""
        self.teacher_logits = table if self.hidden_weight == 0 else None
        if self.teacher_logits is not None or not self.reads_teacher:
            self.teacher = None

    @property
    def reads_teacher(self) -> bool:
        """False with alpha 0 and no hidden-state term: the loss is the student's cross-entropy alone,
        so the teacher is neither run nor kept (its soft term would be weighted by 0)."""
        return self.alpha > 0 or self.hidden_weight > 0

    @torch.no_grad()
    def _teacher_outputs(self, inputs: dict):
        # Keyed by the tensor object itself (kept alive by the cache): an id() of a freed tensor can
        # be reused by the next micro-batch and would hand it another batch's teacher outputs.
        ids = inputs["input_ids"]
        if self._cache is None or self._cache[0] is not ids:
            self._cache = (ids, self.teacher(**inputs, output_hidden_states=self.hidden_weight > 0))
        return self._cache[1]

    def _looked_up(self, batch: dict) -> torch.Tensor:
        if "example_index" not in batch:
            raise ValueError("DistillationLoss with teacher_logits needs each micro-batch's example_index (the row of "
                             "each sample in the training set; dist_dpc's trainer adds it): build the loss without "
                             "teacher_logits to run the teacher on each micro-batch")
        index, real = batch["example_index"], batch["sample_mask"] > 0
        table = self.teacher_logits
        if bool(((index < 0) | (index >= len(table)))[real].any()):
            # The index is not shown: which examples a step sampled is private under Poisson sampling.
            raise ValueError(f"DistillationLoss: an example_index outside the teacher_logits table of {len(table)} rows "
                             "(the table must hold every training example, in dataset order)")
        rows = table[index.clamp(0, len(table) - 1).to(table.device)].to(index.device)
        # Padding rows get a constant (a uniform teacher), never a real example's row: their loss is
        # masked out anyway, and so no private value enters a row that stands for no example.
        return torch.where(real.to(index.device).unsqueeze(-1), rows, torch.zeros_like(rows))

    def __call__(self, forward, batch: dict) -> torch.Tensor:
        inputs = {k: batch[k] for k in self.input_keys if k in batch}
        if self.teacher_logits is not None:
            teacher, teacher_logits = None, self._looked_up(batch)
        elif not self.reads_teacher:
            teacher, teacher_logits = None, None
        else:
            teacher = self._teacher_outputs(inputs)
            teacher_logits = teacher.logits
        student = forward(**inputs, output_hidden_states=self.hidden_weight > 0)
        if teacher_logits is None:  # alpha 0: a constant stands in for the teacher; kd_mix leaves its term out
            teacher_logits = torch.zeros_like(student.logits)
        kd = token_kd_loss if self.token_level else kd_loss
        loss = kd(student.logits, teacher_logits, batch["labels"], self.alpha, self.temperature)
        if self.hidden_weight > 0:
            if self.token_level:  # the positions that predict a text token
                mask = F.pad(batch["labels"][:, 1:] != -100, (0, 1)).unsqueeze(-1).float()
            else:
                mask = batch["attention_mask"].unsqueeze(-1).float()
            tokens = mask.sum((1, 2)).clamp_min(1)
            # hidden_states[0] is the embedding output; layer i's output is hidden_states[i + 1].
            for i, j in enumerate(self.layer_map):
                diff = (student.hidden_states[i + 1].float() - teacher.hidden_states[j + 1].float()) ** 2
                loss = loss + self.hidden_weight * (diff * mask).sum((1, 2)) / (tokens * diff.shape[-1]) / len(self.layer_map)
        return loss


class SyntheticKDObjective(nn.Module):
    """The student's objective on DP synthetic text (Flemings & Annavaram 2024), trained without DP-SGD:
    per text token (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T), plus hidden_weight *
    MSE(projection(student's last hidden state), teacher's last hidden state) on the same positions.
    The projection is a learned Linear when the widths differ (identity otherwise); it trains with
    the student and is not part of the saved student. The frozen teacher is held outside the module's
    parameters (never trained, never saved with it)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, *, alpha: float, temperature: float,
                 hidden_weight: float = 0.0):
        super().__init__()
        if not 0 <= alpha <= 1 or temperature <= 0 or hidden_weight < 0:
            raise ValueError(f"kd_weight={alpha!r} (in [0, 1]), temperature={temperature!r} (> 0) and "
                             f"hidden_weight={hidden_weight!r} (>= 0) out of range")
        self.student = student
        self._teacher = (teacher.eval().requires_grad_(False),)  # a tuple: not a registered submodule
        self.alpha, self.temperature, self.hidden_weight = alpha, temperature, hidden_weight
        width_s, width_t = student.config.hidden_size, teacher.config.hidden_size
        # In the student's dtype: a student built under ZeRO-3's zero.Init in bf16 is bf16 already, and
        # DeepSpeed partitions the trainable parameters of one module in one dtype.
        dtype = next(student.parameters()).dtype
        self.projection = (nn.Linear(width_s, width_t, dtype=dtype) if hidden_weight > 0 and width_s != width_t
                           else nn.Identity())

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def forward(self, batch: dict, return_ce: bool = False):
        """(sum of the loss over the batch's counted tokens, number of those tokens), and with
        ``return_ce`` the student's plain next-token cross-entropy summed over the same tokens."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        hidden = self.hidden_weight > 0
        with torch.no_grad():
            teacher = self.teacher(**inputs, output_hidden_states=hidden)
        student = self.student(**inputs, output_hidden_states=hidden)
        ce, kl, mask = token_ce_kl(student.logits, teacher.logits, batch["labels"], self.temperature)
        total = (kd_mix(ce, kl, self.alpha, self.temperature) * mask).sum()
        if hidden:
            h = student.hidden_states[-1][:, :-1]
            weight = getattr(self.projection, "weight", None)  # under bf16 DeepSpeed casts the projection too
            projected = self.projection(h.to(weight.dtype) if weight is not None else h).float()
            diff = ((projected - teacher.hidden_states[-1][:, :-1].float()) ** 2).mean(-1)
            total = total + self.hidden_weight * (diff * mask).sum()
        if not return_ce:
            return total, mask.sum()
        return total, mask.sum(), (ce * mask).sum()
