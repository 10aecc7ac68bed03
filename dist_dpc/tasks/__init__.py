"""Tasks: what a phase needs to know about the objective, so that phases and the trainer never branch on
its name. A task supplies the data (loading, tokenisation, collation), the model (and which part of it
trains beside LoRA adapters), the per-sample loss the DP step clips, and the evaluation metric.

    sequence_classification   labels; a classifier head; cross-entropy; accuracy (and F1)
    causal_lm                 texts with control-code prefixes; an LM head; per-token cross-entropy
                              on the text; perplexity
"""

from dist_dpc.tasks.base import Task
from dist_dpc.tasks.causal_lm import CausalLM
from dist_dpc.tasks.classification import SequenceClassification

TASKS = {"sequence_classification": SequenceClassification, "causal_lm": CausalLM}


def make_task(model_cfg, data_cfg) -> Task:
    """The task of a run: model.task, with the data section's lengths."""
    return TASKS[model_cfg.task](data_cfg)


__all__ = ["TASKS", "CausalLM", "SequenceClassification", "Task", "make_task"]
