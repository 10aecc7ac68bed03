"""DeepSpeed training without DP-SGD, for a phase that never sees private data (distill_synthetic:
a student trained on the DP teacher's synthetic text, post-processing). It shards like the DP
engine -- ZeRO 0-3, bf16, any number of ranks, DeepSpeed checkpoints -- but clips and noises
nothing, so it must never be handed private data: the phase that builds it checks its inputs.

One logical step: every rank runs the same number of micro-batches (ZeRO 2/3 reduce gradients and
ZeRO 3 gathers parameters in collectives that every rank must enter alike; a rank with fewer
examples pads with zero-weight micro-batches), each micro-batch's loss is a *sum* over what it
counts (tokens), and the update's gradient is the sum over all ranks divided by one normaliser
that the caller gives (the step's count over all ranks). DeepSpeed averages gradients over ranks,
so each rank's loss is scaled by world / normaliser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from dist_dpc.engine.ds_config import fill_width_autos

SumLoss = Callable[[torch.nn.Module, dict], torch.Tensor]  # (engine, batch) -> a scalar summed over the batch


class PublicDataEngine:
    """``deepspeed.initialize`` on ``module`` (its parameters with requires_grad train), one logical
    step per ``train_step``. ``width``: the model's hidden size, for HF templates' "auto" buckets."""

    def __init__(self, module: torch.nn.Module, ds_config: dict, *, width: int | None):
        import deepspeed

        trainable = [p for p in module.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("PublicDataEngine: the module has no parameter with requires_grad")
        self.ds, *_ = deepspeed.initialize(model=module, model_parameters=trainable,
                                           config=fill_width_autos(ds_config, width))
        self.world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.steps_done = 0
        self.skipped_steps = 0  # steps whose update DeepSpeed skipped (non-finite gradients)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def train_step(self, micro_batches: list[tuple[dict, float]], loss_fn: SumLoss, normaliser: float) -> float:
        """One update from this rank's ``(batch, weight)`` micro-batches (weight 1, or 0 for padding);
        every rank must pass the same number. Returns the sum of this rank's real (weight-1) losses."""
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch on every rank (pad with weight 0)")
        scale = self.world_size / max(float(normaliser), 1e-12)
        self.ds.train()
        total = 0.0
        for j, (batch, weight) in enumerate(micro_batches):
            self.ds.set_gradient_accumulation_boundary(j == len(micro_batches) - 1)
            batch = {k: v.to(self.ds.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss = loss_fn(self.ds, batch)
            self.ds.backward(loss * (weight * scale))
            total += float(loss.detach()) * weight
        self.ds.step()
        self.steps_done += 1
        if not self.ds.was_step_applied():  # DeepSpeed skips an update on an overflow (fp16; bf16 too)
            self.skipped_steps += 1
        return total

    # -- checkpointing (pipeline.checkpoints.Checkpoints drives these, as for the DP engine) ------------
    def save_checkpoint(self, directory: str | Path, tag: str, client_state: dict | None = None) -> None:
        self.ds.save_checkpoint(str(directory), tag=tag,
                                client_state={"public_engine": {"steps_done": self.steps_done,
                                                                "skipped_steps": self.skipped_steps},
                                              **(client_state or {})})

    def load_checkpoint(self, directory: str | Path, tag: str | None = None) -> dict:
        _, client = self.ds.load_checkpoint(str(directory), tag=tag)
        if client is None:
            raise FileNotFoundError(f"no loadable checkpoint in {directory}")
        self.steps_done = int(client["public_engine"]["steps_done"])
        self.skipped_steps = int(client["public_engine"].get("skipped_steps", 0))
        return client
