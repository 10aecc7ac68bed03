"""Sequence classification: labelled texts (or pairs), a classifier head, cross-entropy, accuracy."""

from __future__ import annotations

import torch

from dist_dpc.data import check_labels, collate, load_task, resolve_num_labels, tokenize_split
from dist_dpc.engine.losses import model_inputs, sequence_classification_loss
from dist_dpc.models import load_sequence_classifier
from dist_dpc.models.loading import LORA_HEAD
from dist_dpc.tasks.base import Task


class SequenceClassification(Task):
    name = "sequence_classification"
    model_class = "AutoModelForSequenceClassification"
    primary_metric = "accuracy"
    higher_is_better = True
    watched = ("loss", "accuracy")
    lora_head = tuple(LORA_HEAD)

    def load_data(self):
        return load_task(self.data_cfg)

    def num_labels(self, data, configured):
        return resolve_num_labels(data, configured)

    def check_split(self, split, num_labels):
        check_labels(split, num_labels)

    def tokenize(self, split, tokenizer, cache_dir, train: bool):
        return tokenize_split(split, tokenizer, self.data_cfg.max_length, cache_dir=cache_dir)

    def collate(self, examples, pad_token_id, num_rows=None, length=None):
        return collate(examples, pad_token_id, num_rows=num_rows, length=length)

    def load_model(self, model_cfg, tokenizer, *, num_labels, label_names, seed):
        return load_sequence_classifier(model_cfg, num_labels, tokenizer, seed=seed, label_names=label_names)

    def loss(self, forward, batch):
        return sequence_classification_loss(forward, batch)

    @torch.no_grad()
    def evaluate(self, model, data, pad_token_id, batch_size, device=None):
        """Accuracy, mean cross-entropy (and F1 of class 1 for two classes); every rank runs it
        (ZeRO-3 needs them all)."""
        was_training = model.training
        model.eval()
        device = device or next(model.parameters()).device
        preds, labels, loss_sum = [], [], 0.0
        for i in range(0, len(data), batch_size):
            batch = collate([data[j] for j in range(i, min(i + batch_size, len(data)))], pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**model_inputs(batch)).logits
            loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
            preds.append(logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
        model.train(was_training)
        p, y = torch.cat(preds), torch.cat(labels)
        out = {"accuracy": float((p == y).float().mean()), "loss": loss_sum / len(y), "examples": int(len(y)),
               "correct": int((p == y).sum())}
        if int(y.max()) <= 1 and int(p.max()) <= 1:
            tp = int(((p == 1) & (y == 1)).sum())
            fp = int(((p == 1) & (y == 0)).sum())
            fn = int(((p == 0) & (y == 1)).sum())
            out["f1"] = 2 * tp / max(1, 2 * tp + fp + fn)
        return out

    @torch.no_grad()
    def predictions(self, model, data, pad_token_id, limit=256):
        batch = collate([data[j] for j in range(min(limit, len(data)))], pad_token_id)
        return model(**model_inputs(batch)).logits.argmax(-1)

    @staticmethod
    def describe(m):
        return (f"accuracy {m['accuracy'] * 100:.2f}% on {m['examples']} examples"
                + (f", F1 {m['f1'] * 100:.2f}" if "f1" in m else ""))
