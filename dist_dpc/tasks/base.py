"""The interface every task implements (dist_dpc.tasks)."""

from __future__ import annotations

from typing import Callable

import torch

from dist_dpc.data import DataConfig
from dist_dpc.data.splits import TaskData, TextSplit


GENERATIVE_PHASES = ("histogram", "generate", "distill_synthetic")  # need a task that generates text


class Task:
    name: str = ""
    model_class: str = ""            # the transformers Auto class that reloads a saved model
    primary_metric: str = ""         # what tables and `dpc report` show first
    higher_is_better: bool = True
    watched: tuple[str, ...] = ()    # eval metrics logged during training (train.eval_every)
    lora_head: tuple[str, ...] = ()  # parameter-name patterns that train beside LoRA adapters by default
    unsupported_phases: tuple[str, ...] = ()  # phases refused for this task (before anything runs)
    generates: bool = False          # `dpc generate` samples text from its models
    token_level: bool = False        # the objective is per token (distillation compares every text token)

    def __init__(self, data_cfg: DataConfig):
        self.data_cfg = data_cfg

    # -- data ------------------------------------------------------------------------------------
    def load_data(self) -> TaskData:
        raise NotImplementedError

    def num_labels(self, data: TaskData, configured: int | None) -> int | None:
        """Classifier outputs (None: the task has no classifier)."""
        return None

    def check_split(self, split: TextSplit, num_labels: int | None) -> None:
        """Refuse malformed data before training."""

    def tokenize(self, split: TextSplit, tokenizer, cache_dir, train: bool):
        raise NotImplementedError

    def collate(self, examples: list[dict], pad_token_id: int, num_rows: int | None = None,
                length: int | None = None) -> dict:
        """One batch: ``num_rows`` rows (padding rows: sample_mask 0); every row padded to the longest
        example, or to exactly ``length`` tokens."""
        raise NotImplementedError

    def audit_canaries(self, generator, count: int, num_labels: int | None) -> TextSplit:
        """Black-box canaries for `dpc audit` (docs/audit.md): ``count`` training examples no real
        example resembles, drawn from ``generator``; each is scored by how much training lowered its
        loss. The default: texts of random letter strings (classification adds random labels)."""
        texts = [random_text(generator) for _ in range(count)]
        labels = [int(x) for x in generator.integers(0, num_labels, count)] if num_labels else None
        return TextSplit("audit_canaries", texts, None, labels)

    # -- model -----------------------------------------------------------------------------------
    def load_model(self, model_cfg, tokenizer, *, num_labels: int | None, label_names: list[str] | None,
                   seed: int) -> torch.nn.Module:
        raise NotImplementedError

    # -- objective and metric --------------------------------------------------------------------
    def loss(self, forward: Callable, batch: dict) -> torch.Tensor:
        """Per-sample loss, shape (B,): what the DP step clips."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, data, pad_token_id: int, batch_size: int, device=None) -> dict:
        raise NotImplementedError

    def predictions(self, model: torch.nn.Module, data, pad_token_id: int, limit: int = 64) -> torch.Tensor:
        """Deterministic outputs on the first examples: an exported model must reproduce them."""
        raise NotImplementedError

    @staticmethod
    def describe(metrics: dict) -> str:
        """One line for the printed summary."""
        return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))

    def refuse_unsupported(self, phase: str) -> None:
        if phase in GENERATIVE_PHASES and not self.generates:
            raise ValueError(f"{phase} belongs to the synthetic-text path of a causal LM (histogram of control codes, "
                             f"generate, distill_synthetic), but model.task={self.name!r} trains a classifier: set "
                             "model.task=causal_lm (and a causal LM as model.name)")
        if phase in self.unsupported_phases:
            raise ValueError(f"{phase} is not supported for model.task={self.name!r} yet: run teacher, eval, export "
                             "(pipeline.phases=[teacher, eval, export]), `dpc train` or `dpc generate`")


def random_text(generator, words: int = 8) -> str:
    """Out-of-distribution text: ``words`` random lower-case strings of 3 to 8 letters."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(letters[i] for i in generator.integers(0, 26, int(generator.integers(3, 9))))
                    for _ in range(words))
