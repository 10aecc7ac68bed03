"""Structured DPIMP on a saved model, one tensor at a time: rank the transformer layers and write the
shallower model, without ever building the whole model on any rank.

A structured pruning round starts from the previous round's saved model (HF directory). Ranking its
layers needs only each layer's matrices' mean |w|, so the weights are streamed from the safetensors
(or torch) files one tensor at a time; the kept layers are then written, renumbered, into a new
directory that the round loads (under ZeRO 3 DeepSpeed partitions it as usual). The removed layers
are never loaded and have no optimizer state to drop. Reading released DP weights is
post-processing: no privacy cost.

The layer stacks are those of ``transformer_layers`` (BERT / RoBERTa ``encoder.layer``, GPT-2
``transformer.h``, Llama-style ``model.layers``), recognised here by their tensor names.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch

# "<stack>.<index>.<rest>" for the stacks transformer_layers knows (an optional model prefix before them).
LAYER_NAME = re.compile(r"^(?P<stack>(?:.*\.)?(?:encoder\.layer|transformer\.h|model\.layers))\.(?P<index>\d+)\."
                        r"(?P<rest>.+)$")
COUNT_KEYS = ("num_hidden_layers", "n_layer")


def _weight_files(directory: Path) -> list[Path]:
    if (directory / "pytorch_model.bin.index.json").is_file():
        raise ValueError(f"{directory}: a sharded pytorch_model.bin checkpoint; save the model as safetensors "
                         "(save_pretrained's default) to prune it")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise FileNotFoundError(f"{directory}: no model.safetensors(.index.json) or pytorch_model.bin to prune")


def _tensors(path: Path):
    """(name, tensor) one at a time; a safetensors file is memory-mapped, never read whole."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        yield from state.items()


def layer_importance_on_disk(directory: Path) -> list[float]:
    """Mean |w| over each layer's matrices (2-D ``*.weight`` tensors: Linear and GPT-2 Conv1D), as
    ``pruning.layer_importance`` computes it on a module, in float64, one tensor in memory at a time."""
    sums: dict[int, float] = defaultdict(float)
    counts: dict[int, int] = defaultdict(int)
    stacks = set()
    for path in _weight_files(Path(directory)):
        for name, tensor in _tensors(path):
            match = LAYER_NAME.match(name)
            if not match:
                continue
            stacks.add(match["stack"])
            index = int(match["index"])
            counts.setdefault(index, 0)
            if match["rest"].endswith("weight") and tensor.dim() == 2:
                sums[index] += float(tensor.double().abs().sum())
                counts[index] += tensor.numel()
    if len(stacks) != 1:
        raise ValueError(f"{directory}: expected one stack of transformer layers, found {sorted(stacks) or 'none'}")
    depth = max(counts) + 1
    if sorted(counts) != list(range(depth)):
        raise ValueError(f"{directory}: layers {sorted(counts)} are not numbered 0..{depth - 1}")
    return [sums[i] / max(1, counts[i]) for i in range(depth)]


def saved_depth(directory: Path) -> int:
    """How many transformer layers a saved model has, from its config.json (no weights read)."""
    config = json.loads((Path(directory) / "config.json").read_text())
    for key in COUNT_KEYS:
        if key in config:
            return int(config[key])
    raise ValueError(f"{directory}/config.json has none of {COUNT_KEYS}: cannot say how many layers it has")


def choose_layers(scores: list[float], num_to_keep: int, keep_last: bool = True) -> list[int]:
    """The ``num_to_keep`` most important layers in their original order; with ``keep_last`` the last
    layer is kept whatever its score (see pruning.drop_layers). Ties go to the lower index."""
    depth = len(scores)
    if not 1 <= num_to_keep <= depth:
        raise ValueError(f"prune.target_layers={num_to_keep} is invalid: must be in [1, {depth}]")
    protected = [depth - 1] if keep_last else []
    ranked = sorted((i for i in range(depth) if i not in protected), key=lambda i: (-scores[i], i))
    return sorted(protected + ranked[:num_to_keep - len(protected)])


def write_kept_layers(source: Path, target: Path, keep: list[int]) -> None:
    """``target``: ``source`` with only the layers ``keep``, renumbered 0..len(keep)-1 (config and
    the other top-level files copied; subdirectories such as a DP-LoRA ``adapter/`` indexed for the
    full depth are not). Written to a temporary directory and swapped in by renames."""
    source, target = Path(source), Path(target)
    new_index = {old: new for new, old in enumerate(keep)}
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    weights = set(_weight_files(source)) | {source / "model.safetensors.index.json"}
    tmp.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and f not in weights:
            shutil.copy2(f, tmp / f.name)
    config = json.loads((source / "config.json").read_text())
    keys = [k for k in COUNT_KEYS if k in config]
    if not keys:
        raise ValueError(f"{source}/config.json has none of {COUNT_KEYS}: cannot say how many layers remain")
    for k in keys:
        config[k] = len(keep)
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = [config["layer_types"][i] for i in keep]
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    kept = {}
    for path in _weight_files(source):
        for name, tensor in _tensors(path):
            match = LAYER_NAME.match(name)
            if match is None:
                kept[name] = tensor
            elif int(match["index"]) in new_index:
                kept[f"{match['stack']}.{new_index[int(match['index'])]}.{match['rest']}"] = tensor
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in kept.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
