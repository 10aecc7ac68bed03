"""One pass of a frozen computation over the private training set, gathered in dataset order.

Each rank computes its share of the rows (rank r: rows r, r + world, ...) in batches, and every rank
gets the whole (N, ...) result back. Used for what is computed once per example and then read many
times inside the phase: head_init's [CLS] states and a distillation teacher's logits. Nothing here
is released; what is derived from it is, through the DP mechanisms that read it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dist_dpc.engine.losses import model_inputs
from dist_dpc.pipeline.trainer import local_device


def per_example_outputs(ctx, compute: Callable[[dict], torch.Tensor], *, batch_size: int | None = None) -> torch.Tensor:
    """``compute(batch) -> (rows, ...)`` on every training example; float32 on the CPU, (N, ...) in
    dataset order on every rank. ``compute`` runs without gradients on batches already on this
    rank's device. Every rank runs as many batches as the rank with the most rows, because a
    partitioned (ZeRO-3) model's forward is a collective: a rank with fewer runs its last ones on a
    throw-away batch.

    Every batch is padded to data.max_length, so its shape depends on N and the config alone: an
    example's output is then computed the same way whichever examples share its batch (padded to
    their longest, it would differ with their lengths in the last bits, and removing one example
    would move every later row into another batch)."""
    device = local_device()
    world, data, pad = ctx.world, ctx.train_set, ctx.tokenizer.pad_token_id
    mine = list(range(world.rank, len(data), world.world_size))
    batch_size = batch_size or max(ctx.cfg.train.micro_batch_size, 64)
    passes = math.ceil(math.ceil(len(data) / world.world_size) / batch_size)
    parts = []
    for b in range(passes):
        rows = mine[b * batch_size:(b + 1) * batch_size]
        batch = ctx.task.collate([data[i] for i in (rows or mine[:1] or [0])], pad, length=ctx.cfg.data.max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            out = compute(batch).float().cpu()
        if rows:
            parts.append(out)
    gathered = [None] * world.world_size
    torch.distributed.all_gather_object(gathered, (mine, torch.cat(parts) if parts else None))
    order = [i for rows, _ in gathered for i in rows]
    values = torch.cat([v for _, v in gathered if v is not None])
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return values[inverse]


def teacher_logits(ctx, teacher: torch.nn.Module) -> torch.Tensor:
    """The frozen teacher's logits of every training example, (N, ...) in dataset order. A whole
    teacher is moved to this rank's device; a partitioned one (ZeRO 3) runs as it is."""
    if not hasattr(teacher, "ds_inference"):
        teacher.eval().to(local_device())
    return per_example_outputs(ctx, lambda batch: teacher(**model_inputs(batch)).logits)
