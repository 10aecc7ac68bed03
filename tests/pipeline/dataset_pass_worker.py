"""Run under torchrun: dataset_pass.per_example_outputs on this world, rank 0 saves what it got.
Seven examples in passes of 3 rows: rank 0 has 4 rows (2 passes), rank 1 has 3 (1 pass, then a
throw-away one), so the gather must put rows back in dataset order across uneven shares."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch

from dist_dpc.data import collate
from dist_dpc.engine import init_distributed
from dist_dpc.engine.losses import model_inputs
from dist_dpc.models import ModelConfig, load_sequence_classifier
from dist_dpc.pipeline.dataset_pass import per_example_outputs


def examples(n: int, vocab: int) -> list[dict]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        length = 3 + i % 4  # lengths differ, so batches are padded
        ids = torch.randint(1, vocab, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": i % 2})
    return out


def toy_context(data: list[dict], *, micro_batch_size: int, max_length: int, world=None) -> SimpleNamespace:
    """What dataset_pass and the trainer's micro_batch read of a phase context, over ``data``
    (classification collate, pad id 0)."""
    return SimpleNamespace(world=world, train_set=data, tokenizer=SimpleNamespace(pad_token_id=0),
                           task=SimpleNamespace(collate=lambda ex, pad, num_rows=None, length=None:
                                                collate(ex, pad, num_rows=num_rows, length=length)),
                           cfg=SimpleNamespace(train=SimpleNamespace(micro_batch_size=micro_batch_size),
                                               data=SimpleNamespace(max_length=max_length)))


def main(out_file: str) -> None:
    world = init_distributed()
    model = load_sequence_classifier(ModelConfig(name="tiny-bert", dropout=0.0), num_labels=2, seed=7).eval()
    data = examples(7, model.config.vocab_size)
    ctx = toy_context(data, micro_batch_size=3, max_length=8, world=world)
    logits = per_example_outputs(ctx, lambda batch: model(**model_inputs(batch)).logits, batch_size=3)
    if world.is_main:
        torch.save(logits, out_file)


if __name__ == "__main__":
    main(sys.argv[1])
