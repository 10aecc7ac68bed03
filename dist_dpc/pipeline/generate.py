"""`dpc generate`: batched sampling from a trained causal LM, sharded and resumable.

Post-processing of a DP model: it reads no private data and spends nothing (the model directory's
lineage carries its cost). The samples are planned before anything runs: prompts (control codes and
counts) expand into sample ids 0..N-1, cut into batches of one prompt each; batch b belongs to shard
b % generate.shards (a SLURM array task) and, within it, to rank (b // shards) % world. Batch b samples
with seed (generate.seed, b), so its text does not depend on how the work was split, and it is written
atomically as one file: a killed job reruns only the batches without a file. When every batch is
there, the merge writes RUN/generate/samples.jsonl (datasets.load_dataset("json", data_files=...)).

    RUN/generate/plan.json  batches/batch-000000.jsonl ...  samples.jsonl  summary.json
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_dpc.data.lm import control_prefix, prompt_ids
from dist_dpc.pipeline.config import Config, GenerateConfig
from dist_dpc.pipeline.trainer import local_device, open_phase, root_of
from dist_dpc.tasks import make_task
from dist_dpc.utils.atomic import atomic_write
from dist_dpc.utils.logging import log

SHARD_ENV = ("DPC_GENERATE_SHARD", "SLURM_ARRAY_TASK_ID")
SUMMARY = "summary.json"  # not results.json: a finished generation may be rerun (it resumes, never redoes)


@dataclass(frozen=True)
class Batch:
    index: int
    codes: tuple[str, ...]
    first_id: int
    size: int


def read_prompts(g: GenerateConfig, root: Path | None = None) -> list[tuple[tuple[str, ...], int]]:
    """(control codes, count) in a fixed order: generate.prompts, then generate.prompts_file; with
    neither, the allocation of the tree's completed histogram phase (a DP release in its ledger)."""
    if not g.prompts and not g.prompts_file and root is not None:
        from dist_dpc.pipeline.histogram_phase import allocation_prompts

        allocated = allocation_prompts(root)
        if allocated is not None:
            return allocated
    prompts = [(tuple(k.split("\t")) if k else (), int(v)) for k, v in g.prompts.items()]
    if g.prompts_file:
        path = Path(g.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"generate.prompts_file={g.prompts_file!r}: no such file")
        text = path.read_text()
        records = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
        for r in records:
            if not isinstance(r, dict) or "count" not in r or not isinstance(r.get("codes", []), list):
                raise ValueError(f"generate.prompts_file={g.prompts_file!r}: each record is {{\"codes\": [...], "
                                 f"\"count\": n}}, got {r!r}")
            prompts.append((tuple(str(c) for c in r.get("codes", [])), int(r["count"])))
    if not prompts or sum(n for _, n in prompts) == 0:
        raise ValueError("generate: no samples requested: set generate.prompts (control codes -> count, e.g. "
                         "'generate.prompts={\"\": 100}' without control codes) or generate.prompts_file, or run "
                         "the histogram phase first (its DP allocation is used when neither is set)")
    if any(n < 0 for _, n in prompts):
        raise ValueError("generate: prompt counts must be >= 0")
    return prompts


def plan_batches(prompts, batch_size: int) -> list[Batch]:
    batches, next_id = [], 0
    for codes, count in prompts:
        for start in range(0, count, batch_size):
            size = min(batch_size, count - start)
            batches.append(Batch(len(batches), codes, next_id + start, size))
        next_id += count
    return batches


def mine(batches: list[Batch], shard: int, shards: int, rank: int, world: int) -> list[Batch]:
    in_shard = [b for b in batches if b.index % shards == shard]
    return [b for j, b in enumerate(in_shard) if j % world == rank]


def current_shard(g: GenerateConfig) -> int | None:
    """The shard this process runs (None: all of them): DPC_GENERATE_SHARD, or a SLURM array task id."""
    for key in SHARD_ENV:
        if os.environ.get(key) not in (None, ""):
            shard = int(os.environ[key])
            if not 0 <= shard < g.shards:
                raise ValueError(f"{key}={shard} is outside generate.shards={g.shards}")
            return shard
    return None


SOURCE_PHASES = ("teacher", "train")  # phases of a tree whose model generate may sample from


def source_dir(cfg: Config) -> Path:
    """The model to sample from: a completed phase of this tree (by name, resolved only inside the
    tree), or a model directory (its privacy lineage is imported by run_generate)."""
    root, ref = root_of(cfg), cfg.generate.source
    phase_dirs = {"teacher": root / "teacher", "train": root}
    if ref == "auto":
        for name in SOURCE_PHASES:
            if (phase_dirs[name] / "results.json").is_file() and (phase_dirs[name] / "model" / "config.json").is_file():
                return phase_dirs[name] / "model"
        raise FileNotFoundError(f"generate: {root} holds no trained model (teacher or `dpc train`): train one first, "
                                "or set generate.source to a model directory")
    if ref in SOURCE_PHASES:
        if not (phase_dirs[ref] / "results.json").is_file():
            raise FileNotFoundError(f"generate.source={ref!r}: {root} holds no completed {ref} phase; run it first")
        return phase_dirs[ref] / "model"
    path = Path(ref)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"generate.source={ref!r} is neither a phase of this tree ({', '.join(SOURCE_PHASES)}) "
                                "nor a model directory with config.json")
    return path


def model_fingerprint(model_dir: Path) -> str:
    """A hash of a model directory's weights, config and privacy lineage: what the samples were drawn
    from. A student distilled later from the same directory checks it (a retrained teacher differs)."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".bin") or p.name in ("config.json", "privacy_lineage.json")))
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def batch_file(directory: Path, index: int) -> Path:
    return directory / "batches" / f"batch-{index:06d}.jsonl"


def run_generate(cfg: Config) -> dict:
    g = cfg.generate
    make_task(cfg.model, cfg.data).refuse_unsupported("generate")
    prompts = read_prompts(g, root_of(cfg))
    ctx = open_phase(cfg, "generate", load_data=False)
    source = source_dir(cfg)
    from dist_dpc.models import ModelConfig
    from dist_dpc.pipeline.lineage import import_lineage

    # The samples are released with the source model's guarantee: a model trained without DP, or of
    # unknown origin, is refused; one of another tree brings its cost into this tree's ledger.
    import_lineage(ctx, source, role="generate.source")

    model = ctx.task.load_model(ModelConfig(name=str(source), task=cfg.model.task, tokenizer=cfg.model.tokenizer),
                                ctx.tokenizer, num_labels=None, label_names=None, seed=cfg.run.seed)
    model.to(local_device()).eval()
    batches = plan_batches(prompts, g.batch_size)
    directory = ctx.directory
    plan = {"source": str(Path(source).resolve()), "source_fingerprint": model_fingerprint(source),
            "samples": sum(b.size for b in batches), "batches": len(batches),
            "settings": {k: getattr(g, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                                    "no_repeat_ngram_size", "batch_size", "seed")},
            "prompts": [{"codes": list(c), "count": n} for c, n in prompts]}
    if ctx.is_main:
        (directory / "batches").mkdir(parents=True, exist_ok=True)
        _check_plan(directory / "plan.json", plan)
    torch.distributed.barrier()
    shard = current_shard(g)
    shards = [shard] if shard is not None else list(range(g.shards))
    todo = [b for s in shards for b in mine(batches, s, g.shards, ctx.world.rank, ctx.world.world_size)
            if not batch_file(directory, b.index).is_file()]
    log(ctx.world, f"[generate] {plan['samples']} samples in {len(batches)} batches from {source}; shard(s) {shards} "
                   f"of {g.shards}, {len(todo)} batches left on rank {ctx.world.rank}")
    _generate(ctx, model, todo, directory)
    torch.distributed.barrier()
    guarantee = {"epsilon": ctx.ledger.total_epsilon() if ctx.ledger is not None else None,
                 "delta": ctx.ledger.delta if ctx.ledger is not None else None, "private": ctx.ledger is not None}
    if ctx.is_main:
        # The samples carry the tree's whole spend (the source's cost, a histogram's allocation): a
        # student trained on them in another tree imports it from here (distill_synthetic).
        from dist_dpc.pipeline.lineage import write_lineage

        write_lineage(directory, ctx.ledger, phase="generate")
    results = merge(directory, batches, ctx.is_main, guarantee, g.shards)
    torch.distributed.barrier()
    return results


def _check_plan(path: Path, plan: dict) -> None:
    """A resumed generation must be the same plan: batches written under other settings would mix."""
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            raise ValueError(f"generate: {path.parent} holds samples of another plan (source, prompts or sampling "
                             "settings differ): use another run.name, or delete that directory to start over")
        return
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(plan, indent=2)))


@torch.no_grad()
def _generate(ctx, model, todo: list[Batch], directory: Path) -> None:
    from tqdm import tqdm

    bar = tqdm(total=sum(b.size for b in todo), desc=f"generate rank {ctx.world.rank}", unit="sample",
               disable=not todo, mininterval=5)
    for b in todo:
        rows = sample_batch(model, ctx.tokenizer, ctx.cfg.generate, b)
        atomic_write(batch_file(directory, b.index),
                     lambda tmp, rows=rows: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))
        bar.update(b.size)
    bar.close()


@torch.no_grad()
def sample_batch(model, tok, g: GenerateConfig, b: Batch, synced: bool = False) -> list[dict]:
    """The samples of batch ``b`` (seeded by (generate.seed, b)): {id, codes, prompt, text} each.
    ``synced``: HF's synced_gpus, for a ZeRO-3 module whose every forward is a collective (a rank that
    reaches EOS first keeps stepping until all ranks are done)."""
    device = next(model.parameters()).device
    prefix = control_prefix(b.codes) if b.codes else ""
    prompt = prompt_ids(tok, prefix)
    if not prompt:  # a model without BOS and no control codes: start from EOS (GPT-2's convention)
        prompt = [tok.eos_token_id]
    ids = torch.tensor([prompt] * b.size, device=device)
    torch.manual_seed(_batch_seed(g.seed, b.index))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                         max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                         no_repeat_ngram_size=g.no_repeat_ngram_size, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, synced_gpus=synced)
    rows = []
    for j in range(b.size):
        new = out[j, len(prompt):].tolist()
        if tok.eos_token_id in new:
            new = new[:new.index(tok.eos_token_id)]
        rows.append({"id": b.first_id + j, "codes": list(b.codes), "prompt": prefix,
                     "text": tok.decode(new, skip_special_tokens=True)})
    return rows


def _batch_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"generate:{seed}:{index}".encode(), digest_size=8).digest(), "little") >> 1


def merge(directory: Path, batches: list[Batch], writer: bool, guarantee: dict | None = None,
          shards: int | None = None) -> dict:
    """samples.jsonl once every batch file is there (any process may call it; a lock makes one write
    it): ids 0..N-1 each exactly once, in order."""
    missing = [b.index for b in batches if not batch_file(directory, b.index).is_file()]
    total = sum(b.size for b in batches)
    if missing:
        return {"complete": False, "missing_batches": len(missing), "samples": total,
                "missing_shards": sorted({b % shards for b in missing}) if shards else None}
    if writer:
        with open(directory / ".merge.lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            rows = []
            for b in batches:
                got = [json.loads(x) for x in batch_file(directory, b.index).read_text().splitlines() if x]
                if [r["id"] for r in got] != list(range(b.first_id, b.first_id + b.size)):
                    raise RuntimeError(f"generate: {batch_file(directory, b.index)} does not hold samples "
                                       f"{b.first_id}..{b.first_id + b.size - 1}")
                rows += got
            atomic_write(directory / "samples.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))
            # The samples carry the guarantee of the run tree (the source model's cost included);
            # generating added nothing to it.
            results = {"complete": True, "samples": len(rows), "file": str(directory / "samples.jsonl"),
                       **(guarantee or {}), "generation_spent": 0.0, "time": time.time()}
            atomic_write(directory / SUMMARY, lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
            return results
    return {"complete": True, "samples": total, "file": str(directory / "samples.jsonl")}
