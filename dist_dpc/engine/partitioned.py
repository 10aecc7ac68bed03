"""ZeRO-3 partitioned parameters seen whole for a moment: one tensor or one module at a time, never
the whole model on a rank.

A model built under ``deepspeed.zero.Init`` (transformers does so at ZeRO 3: the pipeline's
``built_partitioned``), or owned by a stage-3 engine, keeps on each module an empty placeholder per
parameter; each rank holds 1/world of it (``ds_tensor``) and ``ds_numel`` / ``ds_shape`` say its full
size. Outside an engine's forward, code that reads or writes a weight (head_init's head, pruning's
magnitudes and masks, saving) gathers just that weight through DeepSpeed's public
``GatheredParameters``. Every call here is a collective when the parameters are partitioned: all
ranks must make the same calls in the same order. On parameters that are not partitioned they do
nothing, so the same code serves ZeRO 0-2.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter (a partitioned one's placeholder has none)."""
    return int(getattr(param, "ds_numel", param.numel()))


def full_shape(param: torch.Tensor) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)


def model_is_partitioned(module: nn.Module) -> bool:
    return any(is_partitioned(p) for p in module.parameters())


@contextmanager
def whole(params: Iterable[torch.Tensor], *, modify: bool = False) -> Iterator[None]:
    """Inside, ``params`` are whole on every rank. ``modify``: what rank 0 holds on exit becomes every
    rank's partition (change them identically on every rank, or on rank 0 only)."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def one_at_a_time(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) for each parameter in turn, its gathered copy released before the next."""
    for name, param in named:
        with whole([param]):
            yield name, param


@contextmanager
def gathered_forward(module: nn.Module) -> Iterator[None]:
    """Forward passes of a partitioned ``module`` outside any engine: every submodule's own parameters
    are gathered for its forward and released when it returns (what ZeRO-3 inference does, with the
    public API), so at most one module's weights are whole at a time. Every rank must run the same
    forwards. A module whose forward reads another module's weight without calling it is not covered:
    gather that weight with ``whole``."""
    owners = [m for m in module.modules() if any(is_partitioned(p) for p in m.parameters(recurse=False))]
    if not owners:
        yield
        return
    import deepspeed

    open_gathers: list = []

    def before(m, args):
        gather = deepspeed.zero.GatheredParameters(list(m.parameters(recurse=False)))
        gather.__enter__()
        open_gathers.append(gather)

    def after(m, args, output):
        open_gathers.pop().__exit__(None, None, None)

    handles = [h for m in owners for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while open_gathers:  # a forward that raised half-way
            open_gathers.pop().__exit__(None, None, None)


def gathered_state_dict(module: nn.Module, *, keep: bool) -> dict[str, torch.Tensor] | None:
    """``module.state_dict()`` as CPU tensors, each partitioned parameter gathered on its own and
    released before the next; ``keep``: whether this rank keeps the copies (rank 0 when saving; the
    others take part in the gathers and get None)."""
    state = module.state_dict()  # the keys, in order (a partitioned parameter: its empty placeholder)
    tensors = dict(module.named_buffers(remove_duplicate=False))
    tensors.update(module.named_parameters(remove_duplicate=False))
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        tensor = tensors.get(name, value)
        with whole([tensor]):
            if keep:
                out[name] = tensor.detach().cpu().clone()
                if out[name].numel() != full_numel(tensor):  # a placeholder no parameter name reached
                    raise RuntimeError(f"{name}: state_dict entry with no matching parameter; its ZeRO-3 "
                                       "partitions could not be gathered")
    return out if keep else None
