"""DP iterative magnitude pruning (Mireshghallah et al. 2022, Alg. 2 and 3): masks and layer removal.

Masks are computed from DP-trained weights only, so choosing them is post-processing and costs no
privacy; what costs privacy is the DP fine-tuning between rounds (dist_dpc.pipeline.phases).

Which weights are pruned: the weight matrices of the Linear (and GPT-2 Conv1D) layers inside the
transformer blocks -- attention projections and MLP. Embeddings, norms, biases, the pooler and the
classifier head stay dense, as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_dpc.compress.distill import student_from_teacher, transformer_layers
from dist_dpc.compress.layer_files import choose_layers
from dist_dpc.engine.distributed import collective_device
from dist_dpc.engine.partitioned import full_numel, full_shape, one_at_a_time, whole

PATTERNS = ("unstructured", "2:4")


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> weight matrix of every Linear/Conv1D inside the transformer blocks (frozen ones too:
    a frozen pruned weight simply stays zero)."""
    layers, _ = transformer_layers(model)
    block_ids = {id(m) for layer in layers for m in layer.modules()}
    out = {}
    for name, module in model.named_modules():
        if id(module) not in block_ids:
            continue
        weight = getattr(module, "weight", None)
        is_matrix = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        if is_matrix and isinstance(weight, nn.Parameter):
            out[f"{name}.weight"] = weight
    if not out:
        raise ValueError(f"{type(model).__name__}: no prunable Linear weights inside its transformer layers")
    return out


def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float,
                           previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Keep the (1 - sparsity) fraction of largest |w| over all matrices together (one global
    threshold, so layers that matter less lose more). Already-pruned weights stay pruned.

    Exactly ``round(sparsity * n)`` weights go; ties at the threshold go in the order of the matrices
    and of their flattened coordinates, so the masks are the same at every world size. With several
    ranks nothing is gathered or sorted whole: each rank ranks only its 1/world slice of that order,
    and the threshold is found by a bisection over all-reduced counts (``_threshold_search``)."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"prune.target_sparsity={sparsity!r} is invalid: must be in [0, 1)")
    names = list(weights)
    sizes = [full_numel(weights[n]) for n in names]
    total = sum(sizes)
    num_pruned = int(round(sparsity * total))
    rank, world = _rank_world()
    begin, end = total * rank // world, total * (rank + 1) // world  # this rank's slice of the global order
    keys = _magnitude_keys(weights, previous, names, begin, end)
    pruned = _threshold_search(keys, num_pruned, rank, world)
    keep = _all_gather_slices(~pruned, total, world)
    return {n: piece.view(full_shape(weights[n])) for n, piece in zip(names, keep.split(sizes))}


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _magnitude_keys(weights, previous, names, begin: int, end: int) -> torch.Tensor:
    """int64 keys ordered like |w| over coordinates [begin, end) of the concatenated matrices: the
    bits of |w| as float32 (non-negative floats order like their bit patterns, so the search over
    integers is exact), and -1 where an earlier round pruned (those go first). A ZeRO-3 partitioned
    weight is gathered on its own (every rank, in turn: a collective) and released before the next."""
    pieces, offset, broken = [], 0, []
    for name, w in one_at_a_time((n, weights[n]) for n in names):
        lo, hi = max(begin, offset), min(end, offset + w.numel())
        if lo < hi:
            flat = w.detach().reshape(-1)[lo - offset:hi - offset].float().abs()
            if not torch.isfinite(flat).all():
                broken.append(name)  # raised after the loop: the other ranks are still gathering
            key = flat.view(torch.int32).long()
            if previous is not None and name in previous:
                kept_before = previous[name].reshape(-1)[lo - offset:hi - offset].to(key.device).bool()
                key = torch.where(kept_before, key, torch.full_like(key, -1))
            pieces.append(key.cpu())
        offset += w.numel()
    count = torch.tensor([len(broken)], dtype=torch.int64, device=collective_device())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)  # every rank raises, none waits in a collective
    if int(count.item()):
        raise ValueError(f"{', '.join(broken) or 'weights on another rank'}: non-finite weights cannot be ranked by "
                         "magnitude; the model is broken")
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


def _threshold_search(keys: torch.Tensor, num_pruned: int, rank: int, world: int) -> torch.Tensor:
    """Which of this rank's keys are among the ``num_pruned`` smallest of all ranks' keys, ties
    broken by global position (rank order, then position in the slice)."""
    def total(count: int) -> int:
        t = torch.tensor([count], dtype=torch.int64, device=collective_device())
        if world > 1:
            torch.distributed.all_reduce(t)
        return int(t.item())

    if num_pruned == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    # The smallest t with #{key <= t} >= num_pruned, by bisection over the key range (33 all-reduces).
    lo, hi = -1, 0x7F800000  # -1: pruned earlier; 0x7F800000: the bits of +inf, above every finite |w|
    while lo < hi:
        mid = (lo + hi) // 2
        if total(int((keys <= mid).sum())) >= num_pruned:
            hi = mid
        else:
            lo = mid + 1
    pruned = keys < lo
    ties = torch.nonzero(keys == lo).flatten()
    wanted = num_pruned - total(int(pruned.sum()))  # ties to prune, taken from the lowest positions
    tie_counts = torch.tensor([ties.numel()], dtype=torch.int64, device=collective_device())
    if world > 1:
        every = [torch.zeros_like(tie_counts) for _ in range(world)]
        torch.distributed.all_gather(every, tie_counts)
        before = int(sum(int(c.item()) for c in every[:rank]))
    else:
        before = 0
    take = min(max(wanted - before, 0), ties.numel())
    pruned[ties[:take]] = True
    return pruned


def _all_gather_slices(piece: torch.Tensor, total: int, world: int) -> torch.Tensor:
    """Every rank's slice of a bool vector, concatenated in rank order (uint8 over the wire)."""
    if world == 1:
        return piece
    width = -(-total // world)
    padded = torch.zeros(width, dtype=torch.uint8, device=collective_device())
    padded[:piece.numel()] = piece.to(padded.device, torch.uint8)
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    bounds = [(total * r // world, total * (r + 1) // world) for r in range(world)]
    return torch.cat([part[:b - a].cpu() for part, (a, b) in zip(parts, bounds)]).bool()


def two_four_masks(weights: dict[str, torch.Tensor], input_dim: dict[str, int]) -> dict[str, torch.Tensor]:
    """In every group of four consecutive weights along the input dimension keep the two largest |w|
    (the pattern torch's semi-structured sparse kernels accelerate)."""
    masks = {}
    for name, w in one_at_a_time(weights.items()):  # ZeRO 3: one weight gathered at a time
        dim = input_dim[name]
        moved = w.detach().abs().float().movedim(dim, -1)
        if moved.shape[-1] % 4:
            raise ValueError(f"{name}: input dimension {moved.shape[-1]} is not a multiple of 4; 2:4 sparsity needs it")
        groups = moved.reshape(*moved.shape[:-1], -1, 4)
        top2 = groups.topk(2, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top2, True)
        masks[name] = keep.reshape(moved.shape).movedim(-1, dim).contiguous()
    return masks


def input_dims(model: nn.Module, names) -> dict[str, int]:
    """nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out)."""
    modules = dict(model.named_modules())
    return {n: 0 if type(modules[n.rsplit(".", 1)[0]]).__name__ == "Conv1D" else 1 for n in names}


def compute_masks(model: nn.Module, pattern: str, sparsity: float,
                  previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    weights = prunable_weights(model)
    if pattern == "unstructured":
        return global_magnitude_masks(weights, sparsity, previous)
    if pattern == "2:4":
        return two_four_masks(weights, input_dims(model, weights))
    raise ValueError(f"prune.method={pattern!r} is invalid for masks: allowed values are {', '.join(PATTERNS)}")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        with whole([params[name]], modify=True):  # ZeRO 3: gathered, masked, re-partitioned
            params[name].mul_(mask.to(params[name].device, params[name].dtype))


class MaskEnforcer:
    """Keeps pruned weights exactly zero during DP training, at every ZeRO stage and precision.

    Installed as a DP-engine post-noise hook: after the noise is added, the gradient of every pruned
    coordinate is zeroed, so the noise drawn for it is discarded and the optimizer never moves it
    (a fresh AdamW/SGD state + zero gradient + zero weight = zero update, weight decay included).
    At ZeRO 0 in fp32 the optimizer steps the module's own parameters and the masks apply as they
    are; at ZeRO 1-3 and in bf16 it steps this rank's flat fp32 partitions, and each rank enforces
    the masks of its own partition (deepspeed_seam.partition_masks maps them); the low-precision
    copies are cast from the fp32 masters after the step, so they stay zero too.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        missing = [n for n in masks if n not in params]
        if missing:
            raise ValueError(f"masks name parameters the model does not have: {missing[:3]}")
        # Frozen weights never receive a gradient: once zeroed they stay zero by themselves. Masks are
        # kept as given, one byte a weight (bool), never as whole float copies on every rank.
        self.pairs = [(params[n], m.bool()) for n, m in masks.items() if params[n].requires_grad]
        self.frozen = [(params[n], m.bool()) for n, m in masks.items() if not params[n].requires_grad]
        self.partitions: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # id -> (fp32 partition, mask)
        self.on_device: list[tuple[torch.Tensor, torch.Tensor]] = []  # ZeRO 0 fp32: (parameter, mask on its device)

    def bind(self, engine) -> None:
        """Follow the engine's optimizer (before its first step) and hook into its noise step."""
        from dist_dpc.engine.deepspeed_seam import hooked_partitions, partition_masks

        stepped = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
        if self.pairs and not all(id(p) in stepped for p, _ in self.pairs):  # partitions (or bf16: refused at ZeRO 0)
            flat = partition_masks(engine.ds, {id(p): m for p, m in self.pairs})
            self.partitions = {id(t): (t, flat[id(t)]) for t in hooked_partitions(engine.ds)}
        else:
            self.on_device = [(p, m.to(p.device)) for p, m in self.pairs]
        engine.post_noise_hooks.append(self)

    @torch.no_grad()
    def __call__(self, optimizer: torch.optim.Optimizer) -> None:
        if self.partitions is None:
            for param, mask in self.on_device or self.pairs:  # (called before bind: the masks as given)
                if param.grad is not None:
                    param.grad.mul_(mask.to(param.grad.device))
            return
        for group in optimizer.param_groups:  # ZeRO-3: this call's sub-group only
            for tensor in group["params"]:
                if tensor.grad is not None:
                    tensor.grad.mul_(self.partitions[id(tensor)][1])

    @torch.no_grad()
    def violations(self) -> int:
        """Pruned coordinates that are not exactly zero (must stay 0) on this rank: in the fp32
        partitions it steps, and in the module's weights where it holds them whole (sum over ranks
        for the whole model)."""
        count = 0
        if self.partitions is not None:
            count += sum(int((t[~mask] != 0).sum()) for t, mask in self.partitions.values())
        for p, m in self.pairs + self.frozen:
            if p.numel() == m.numel():  # ZeRO-3 leaves an empty placeholder on the module
                count += int((p[~m.to(p.device)] != 0).sum())
        return count


def sparsity_stats(model: nn.Module) -> dict:
    """Zeros among the prunable matrices, and over all parameters (ZeRO 3: gathered one at a time)."""
    prunable_names = set(prunable_weights(model))
    prunable = zeros = total = nonzero = 0
    for name, p in one_at_a_time(model.named_parameters()):
        total += p.numel()
        nonzero += int((p != 0).sum())
        if name in prunable_names:
            prunable += p.numel()
            zeros += int((p == 0).sum())
    return {"prunable_sparsity": zeros / max(1, prunable), "parameters": total, "nonzero_parameters": nonzero}


# -- structured: whole transformer layers (Alg. 2) -------------------------------------------------
@torch.no_grad()
def layer_importance(model: nn.Module) -> list[float]:
    """Mean |w| over each transformer layer's prunable matrices: magnitude pruning lifted to whole
    layers (the structure with the smallest weights contributes least to the residual stream)."""
    layers, _ = transformer_layers(model)
    scores = []
    for layer in layers:
        mats = [m.weight for m in layer.modules()
                if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and m.weight is not None]
        total = sum(float(w.abs().sum()) for w in mats)
        scores.append(total / max(1, sum(w.numel() for w in mats)))
    return scores


def drop_layers(model: nn.Module, num_to_keep: int, keep_last: bool = True) -> tuple[nn.Module, list[int]]:
    """A copy of ``model`` keeping its ``num_to_keep`` most important layers, in their original order.

    ``keep_last``: the last layer is kept whatever its score, and the others compete for the
    remaining places. The head reads the last layer's output; in a model whose sentence
    representation forms only at the top, the earlier layers' [CLS] states carry it at a scale
    far below their norm, which is what DP clipping and noise are measured against.
    all-MiniLM-L6-v2 is such a model: on SST-2 its [CLS] state after its first four layers varies
    by 0.004 per dimension across sentences (norm 10.5), against 0.23 after all six (norm 7.6).
    Its last layer also has the smallest mean |w|, so plain magnitude ranking removes it first,
    and the pruned model's DP head stayed at chance (docs/results_history.md)."""
    keep = choose_layers(layer_importance(model), num_to_keep, keep_last)
    return student_from_teacher(model, keep), keep


def depth_schedule(start: int, target: int, rounds: int) -> list[int]:
    """Depth after each round, shrinking evenly from ``start`` to ``target``."""
    return [round(start - (start - target) * (r + 1) / rounds) for r in range(rounds)]


def sparsity_schedule(target: float, rounds: int) -> list[float]:
    """Sparsity after each round, growing evenly to ``target`` (iterative, not one-shot)."""
    return [target * (r + 1) / rounds for r in range(rounds)]
