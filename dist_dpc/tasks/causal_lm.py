"""Causal language modelling: texts with optional control-code prefixes, an LM head, per-token
cross-entropy on the text only, perplexity on held-out texts."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from dist_dpc.data import IGNORE, collate_lm, load_lm_task, tokenize_lm
from dist_dpc.engine.losses import causal_lm_loss
from dist_dpc.models.loading import load_causal_lm
from dist_dpc.data.splits import TextSplit
from dist_dpc.tasks.base import Task


class CausalLM(Task):
    name = "causal_lm"
    model_class = "AutoModelForCausalLM"
    primary_metric = "perplexity"
    higher_is_better = False
    watched = ("loss", "perplexity")
    generates = True
    token_level = True
    lora_head = ()  # the LM head (vocab x hidden, often tied to the embeddings) stays frozen under LoRA
    # tune's private score counts correct predictions (sensitivity 1), which a perplexity has no
    # bounded counterpart of.
    unsupported_phases = ("tune",)

    def load_data(self):
        return load_lm_task(self.data_cfg)

    def tokenize(self, split, tokenizer, cache_dir, train: bool):
        # Training examples are truncated to the context; evaluation texts are kept whole (windows).
        return tokenize_lm(split, tokenizer, self.data_cfg.max_length if train else None, cache_dir=cache_dir)

    def collate(self, examples, pad_token_id, num_rows=None, length=None):
        return collate_lm(examples, pad_token_id, num_rows=num_rows, length=length)

    def audit_canaries(self, generator, count, num_labels):
        # Random secrets after a fixed prefix (the secret-sharer canaries of Carlini et al.): the
        # prefix conditions and carries no loss, so the score is the secret's own likelihood.
        digits = generator.integers(0, 10, (count, 10))
        texts = [" ".join(str(d) for d in row) for row in digits]
        return TextSplit("audit_canaries", texts, None, None, prefixes=["my secret code is "] * count)

    def load_model(self, model_cfg, tokenizer, *, num_labels, label_names, seed):
        return load_causal_lm(model_cfg, tokenizer, seed=seed)

    def loss(self, forward, batch):
        return causal_lm_loss(forward, batch)

    # -- perplexity ------------------------------------------------------------------------------
    def windows(self, example: dict) -> list[dict]:
        """A text of any length as windows of at most max_length tokens advancing by the stride; each
        scored position (label not -100) belongs to exactly one window, the first that ends after it,
        so every token is scored once with as much context as the window gives it."""
        context = self.data_cfg.max_length
        stride = self.data_cfg.eval_stride or max(1, context // 2)
        ids, start = list(example["input_ids"]), int(example["loss_start"])
        out, scored_up_to, begin = [], 1, 0  # position 0 has no context and is never scored
        while True:
            end = min(begin + context, len(ids))
            # Positions [scored_up_to, end) are this window's targets; earlier ones are context only.
            first = max(scored_up_to, start)
            out.append({"input_ids": ids[begin:end], "loss_start": max(first - begin, 0)})
            scored_up_to = end
            if end >= len(ids):
                return out
            begin += stride

    @torch.no_grad()
    def evaluate(self, model, data, pad_token_id, batch_size, device=None):
        """Token-weighted perplexity exp(sum NLL / tokens) over the split's text tokens (windowed),
        the mean NLL per token, and tokens/s of the scoring passes. Every rank runs it."""
        was_training = model.training
        model.eval()
        device = device or next(model.parameters()).device
        windows = [w for i in range(len(data)) for w in self.windows(data[i])]
        nll, tokens, seconds = 0.0, 0, 0.0
        for i in range(0, len(windows), batch_size):
            batch = {k: v.to(device) for k, v in collate_lm(windows[i:i + batch_size], pad_token_id).items()}
            begin = time.perf_counter()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            nll += float(F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE,
                                         reduction="sum"))
            seconds += time.perf_counter() - begin
            tokens += int((targets != IGNORE).sum())
        model.train(was_training)
        loss = nll / max(tokens, 1)
        return {"perplexity": math.exp(loss), "loss": loss, "tokens": tokens, "examples": len(data),
                "tokens_per_s": tokens / seconds if seconds else float("nan")}

    @torch.no_grad()
    def predictions(self, model, data, pad_token_id, limit=16):
        batch = collate_lm([data[j] for j in range(min(limit, len(data)))], pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits.argmax(-1).masked_fill(batch["attention_mask"] == 0, -1)

    @staticmethod
    def describe(m):
        return f"perplexity {m['perplexity']:.3f} ({m['tokens']} text tokens of {m['examples']} texts)"
