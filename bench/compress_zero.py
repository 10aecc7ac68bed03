"""Compression phases under ZeRO 0 vs 2 vs 3 on 2 real ranks: step time and memory per rank, one run.

Three workloads, each stage in its own torchrun job (so each peak is its own):
- ``distill``: one DPKD step of a half-depth student against its teacher (at ZeRO 3 the teacher is
  partitioned too: dist_dpc/engine/frozen.py);
- ``prune``: one DP step of the teacher with 50 % unstructured masks enforced on its partitions;
- ``distill_synthetic``: one step of the synthetic-text student (no DP: engine/public_engine.py), a
  half-depth Llama-shaped causal LM of the same width against its teacher (token KD and the hidden-
  state term), the teacher partitioned at ZeRO 3 as in the phase.
Prints median step time and memory per rank with ratios to ZeRO 0, and writes JSON with ``--json``.

  python bench/compress_zero.py            # CPU: BERT width 512, 4 layers, 2 ranks x 8 x 64 tokens
  python bench/compress_zero.py --workloads distill_synthetic   # the causal-LM student alone
  python bench/compress_zero.py --gpu      # one GPU node: BERT-base size, bf16 at ZeRO 2/3

Loaded per rank: the resident size after the models are loaded (and masked), before DeepSpeed
builds anything, minus the size just before loading (host memory: at ZeRO 3 transformers reads the
whole checkpoint on rank 0's host and copies it in layer by layer).
Model state per rank: the bytes of the parameters, optimizer partitions, Adam moments and teacher
weights this rank holds between steps, counted from the tensors (what ZeRO shards). Peak memory per
rank: on a GPU, the peak of torch.cuda.max_memory_allocated; on the CPU, the peak resident
set size minus the resident size just before the models are built (imports and the process itself
excluded), which counts every tensor the phase creates, the loading included. Allocated per rank (the CPU's
stand-in for the GPU's memory_allocated / max_memory_allocated; on a GPU, those): what glibc's malloc
has handed out (mallinfo2) minus the same before the models were built, between two steps, and at
the peak of one more step (sampled every 0.1 ms). Tensors count whole as allocated; library code and
memory the allocator keeps after a free do not. "A step adds" (peak minus between) is what a step
needs on top of what the rank holds: activations, gradients, gathered layers and buffers.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def settings(gpu: bool) -> dict:
    if gpu:
        return {"hidden": 768, "layers": 12, "heads": 12, "vocab": 30522, "batch": 32, "length": 128, "steps": 10,
                "warmup": 3, "bf16": True}
    return {"hidden": 512, "layers": 4, "heads": 8, "vocab": 8000, "batch": 8, "length": 64, "steps": 4, "warmup": 1,
            "bf16": False}


def build_teacher(s: dict):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                        num_attention_heads=s["heads"], intermediate_size=4 * s["hidden"], num_labels=2,
                        max_position_embeddings=max(512, s["length"]), hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_lm_teacher(s: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["heads"] // 2,
                         intermediate_size=int(2.75 * s["hidden"]), max_position_embeddings=max(512, s["length"]),
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def save_models(s: dict, directory: Path) -> None:
    """The teachers (a BERT classifier; a Llama-shaped causal LM) and their half-depth students (every
    other layer, cut from the teacher's files)."""
    from dist_dpc.compress.distill import every_other_layer
    from dist_dpc.compress.layer_files import write_kept_layers

    build_teacher(s).save_pretrained(directory / "teacher")
    write_kept_layers(directory / "teacher", directory / "student", every_other_layer(s["layers"]))
    build_lm_teacher(s).save_pretrained(directory / "lm_teacher")
    write_kept_layers(directory / "lm_teacher", directory / "lm_student", every_other_layer(s["layers"]))


def load(path: Path, ds_config: dict, stage: int):
    """As the pipeline's phases load a model (pipeline/trainer.py load_for_phase): at ZeRO 3 inside
    deepspeed.zero.Init through transformers' HfDeepSpeedConfig, else whole."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    auto = AutoModelForCausalLM if path.name.startswith("lm_") else AutoModelForSequenceClassification
    if stage != 3:
        model = auto.from_pretrained(path, use_kernels=False)
        # Copied out of the file's memory map into allocated memory, as moving it to a GPU would: the
        # CPU's allocated peak then counts the weights at every stage (ZeRO 3 copies them into its partitions).
        for p in model.parameters():
            p.data = p.data.clone()
        return model
    setting = HfDeepSpeedConfig(ds_config)
    try:
        return auto.from_pretrained(path, use_kernels=False)
    finally:
        unset_hf_deepspeed_config()
        del setting


def worker(workload: str, stage: int, s: dict, models: Path, lean: bool = False) -> dict:
    import torch

    from dist_dpc.compress.distill import DistillationLoss
    from dist_dpc.compress.pruning import MaskEnforcer, apply_masks, compute_masks
    from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
    from dist_dpc.engine.frozen import place_frozen
    from dist_dpc.engine.losses import sequence_classification_loss
    from dist_dpc.privacy import PrivacyConfig
    from dist_dpc.privacy.randomness import SecretKey

    world = init_distributed()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", world.local_rank) if cuda else torch.device("cpu")
    # Buckets sized from the width as HF's templates' "auto" sizes them (DeepSpeed's default reduce
    # bucket, 5e8 elements allocated whole, would dominate a GPU's peak at this size); every parameter
    # partitioned at ZeRO 3.
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto"}
    if lean:  # ZeRO 3 releases each gathered layer after use (DeepSpeed keeps up to 1e9 elements live by default)
        zero.update(stage3_max_live_parameters=s["hidden"] ** 2, stage3_max_reuse_distance=0)
    ds = build_ds_config({"zero_optimization": zero},
                         micro_batch_size=s["batch"], world_size=world.world_size, zero_stage=stage, lr=1e-4,
                         weight_decay=0.0, optimizer="adamw", bf16=s["bf16"] and stage > 0)
    base, allocated_base = rss_bytes(), malloc_in_use()
    if workload == "distill_synthetic":
        return _synthetic_worker(stage, s, models, ds, world, device, base, allocated_base)
    teacher = load(models / "teacher", ds, stage)
    enforcer = None
    if workload == "distill":
        model = load(models / "student", ds, stage)
        frozen = place_frozen(teacher, ds, device)  # as the phases place it (pipeline.trainer.frozen_for_phase)
        loss_fn = DistillationLoss(frozen, alpha=0.5, temperature=2.0)
    else:
        model = teacher
        masks = compute_masks(model, "unstructured", 0.5)
        apply_masks(model, masks)
        enforcer = MaskEnforcer(model, masks)
        loss_fn = sequence_classification_loss
    loaded = rss_bytes() - base  # the models as loaded (and masked), before DeepSpeed's buffers
    total = s["steps"] + s["warmup"]
    engine = DPEngine(model, ds, PrivacyConfig(target_epsilon=None, noise_multiplier=1.0, delta=1e-7),
                      dataset_size=10**6, expected_batch_size=s["batch"] * world.world_size, planned_steps=total + 1,
                      loss_fn=loss_fn, world=world, key=SecretKey.generate())
    if enforcer is not None:
        enforcer.bind(engine)
    gen = torch.Generator().manual_seed(1 + world.rank)
    b, t = s["batch"], s["length"]
    batch = {"input_ids": torch.randint(1, s["vocab"], (b, t), generator=gen).to(device),
             "attention_mask": torch.ones(b, t, dtype=torch.long, device=device),
             "token_type_ids": torch.zeros(b, t, dtype=torch.long, device=device),
             "labels": torch.randint(0, 2, (b,), generator=gen).to(device), "sample_mask": torch.ones(b, device=device)}

    def step():
        engine.train_step([batch], logical_batch_size=b * world.world_size)

    out = _measure(step, s, world, base, allocated_base, loaded, lambda: model_state_bytes(engine, loss_fn), device)
    if enforcer is not None:
        assert enforcer.violations() == 0
    return out


def _synthetic_worker(stage: int, s: dict, models: Path, ds: dict, world, device, base: int,
                      allocated_base: int | None) -> dict:
    """The distill_synthetic step, placed as the phase places it: student under PublicDataEngine,
    teacher partitioned at ZeRO 3 (else whole), both built under zero.Init at ZeRO 3."""
    import torch

    from dist_dpc.compress.distill import SyntheticKDObjective
    from dist_dpc.engine.frozen import place_frozen
    from dist_dpc.engine.public_engine import PublicDataEngine

    teacher = load(models / "lm_teacher", ds, stage)
    student = load(models / "lm_student", ds, stage).requires_grad_(True)
    teacher = place_frozen(teacher, ds, device)
    objective = SyntheticKDObjective(student, teacher, alpha=0.4, temperature=1.0, hidden_weight=0.2)
    loaded = rss_bytes() - base
    engine = PublicDataEngine(objective, ds, width=s["hidden"])
    gen = torch.Generator().manual_seed(1 + world.rank)
    b, t = s["batch"], s["length"]
    ids = torch.randint(1, s["vocab"], (b, t), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100  # control codes carry no loss
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones(b, t, dtype=torch.long, device=device),
             "labels": labels.to(device)}
    tokens = int((labels[:, 1:] != -100).sum()) * world.world_size

    def step():
        engine.train_step([(batch, 1.0)], lambda e, x: e(x)[0], normaliser=tokens)

    return _measure(step, s, world, base, allocated_base, loaded,
                    lambda: model_state_bytes(engine, objective), device)


def _measure(step, s: dict, world, base: int, allocated_base: int | None, loaded: int, state_bytes, device) -> dict:
    """Median step time, peak and allocated memory per rank (the largest rank's), as ``worker`` reports them."""
    import gc

    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(s["steps"] + s["warmup"]):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= s["warmup"]:
            times.append(time.perf_counter() - start)
    if cuda:
        memory = int(torch.cuda.max_memory_allocated())
        peak_allocated, between = memory, int(torch.cuda.memory_allocated())
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        gc.collect()
        between = malloc_in_use()
        peak_allocated = allocated_peak(step, allocated_base)
        between = memory if between is None else between - allocated_base
        peak_allocated = memory if peak_allocated is None else peak_allocated
    out = torch.tensor([statistics.median(times), float(memory), float(state_bytes()), float(loaded),
                        float(peak_allocated), float(between)], dtype=torch.float64)
    every = [torch.zeros_like(out) for _ in range(world.world_size)]
    torch.distributed.all_gather(every, out.to(device))
    return {"median_step_s": max(float(e[0]) for e in every), "memory_bytes_per_rank": max(float(e[1]) for e in every),
            "state_bytes_per_rank": max(float(e[2]) for e in every),
            "loaded_bytes_per_rank": max(float(e[3]) for e in every),
            "allocated_peak_bytes_per_rank": max(float(e[4]) for e in every),
            "allocated_between_steps_bytes_per_rank": max(float(e[5]) for e in every),
            "step_adds_bytes_per_rank": max(float(e[4] - e[5]) for e in every)}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _mallinfo2():
    """glibc's mallinfo2, looked up once (the sampler calls it every 0.1 ms), or None without glibc >= 2.33."""
    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _Mallinfo2
    return function


def malloc_in_use() -> int | None:
    """Bytes glibc's malloc has handed out and not yet had back (every arena, mmap-ed blocks included):
    torch's CPU tensors are allocated there, whole, whether or not their pages were touched, and
    nothing freed or any library's code counts. None where glibc (>= 2.33) is not there."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def allocated_peak(step, base: int) -> int | None:
    """The CPU's torch.cuda.max_memory_allocated over one more ``step``: the most malloc_in_use reaches,
    sampled every 0.1 ms by a thread while the step runs (torch's kernels release the GIL; a block
    that lives for less than a sample can be missed), minus ``base`` (the same measure before the
    models were built)."""
    if malloc_in_use() is None:
        return None
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], malloc_in_use())
            time.sleep(1e-4)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the sampler gets the GIL within 10 us of asking (default: 5 ms)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        step()
    finally:
        done.set()
        sampler.join()
        sys.setswitchinterval(interval)
    return max(peak[0], malloc_in_use()) - base


def model_state_bytes(engine, loss_fn) -> int:
    """Bytes of model state this rank holds between steps: the student's parameters as stored on this
    rank (its ZeRO-3 partition, else whole), the fp32 tensors its optimizer steps and their state
    (Adam moments), and the teacher's parameters as stored on this rank. Counted from the tensors
    themselves (distinct storages once), unlike the process's peak RSS, which on the CPU keeps the
    whole-model load and every freed buffer."""
    from dist_dpc.engine.deepspeed_seam import hooked_partitions, inner_torch_optimizer

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is None or t.numel() == 0:
            return
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    def params(module):
        for p in module.parameters():
            add(p.ds_tensor if hasattr(p, "ds_tensor") else p.data)

    params(engine.ds.module)
    for t in hooked_partitions(engine.ds):
        add(t)
    for state in inner_torch_optimizer(engine.ds).state.values():
        for v in state.values():
            if hasattr(v, "untyped_storage"):
                add(v)
    teacher = getattr(loss_fn, "teacher", None)
    if teacher is not None:
        params(teacher)
    return total


def run(workload: str, stage: int, gpu: bool, ranks: int, models: Path, lean: bool = False) -> dict:
    from tests.engine.launch import _free_port

    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cuda" if gpu else "cpu"))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // ranks)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(_free_port()), __file__, "--worker", workload, "--stage", str(stage), "--models", str(models)] + (["--gpu"] if gpu else []) + (["--lean"] if lean else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{workload} at ZeRO {stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="BERT-base size in bf16 (one GPU per rank)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--stages", default="0,2,3")
    parser.add_argument("--json", help="write the records to this JSON file")
    parser.add_argument("--workloads", default="distill,prune,distill_synthetic")
    parser.add_argument("--lean", action="store_true",
                        help="ZeRO 3 releases every gathered layer after its use (stage3_max_live_parameters = "
                             "hidden^2, stage3_max_reuse_distance = 0): memory over speed")
    parser.add_argument("--worker", choices=("distill", "prune", "distill_synthetic"), help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    s = settings(args.gpu)
    if args.worker:
        out = worker(args.worker, args.stage, s, args.models, args.lean)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(out), flush=True)
        return
    stages = [int(x) for x in args.stages.split(",")]
    import tempfile

    models = Path(tempfile.mkdtemp(prefix="compress_zero_"))
    save_models(s, models)
    records = []
    print(f"shape: {s}, {args.ranks} ranks")
    print("| workload | ZeRO | step s | vs ZeRO 0 | model state/rank MB | vs ZeRO 0 | loaded/rank MB | vs ZeRO 0 "
          "| peak memory/rank MB | vs ZeRO 0 | allocated between steps/rank MB | vs ZeRO 0 | a step adds MB | vs ZeRO 0 | allocated peak/rank MB | vs ZeRO 0 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workload in args.workloads.split(","):
        first = None
        for stage in stages:
            r = run(workload, stage, args.gpu, args.ranks, models, args.lean)
            first = first or r
            records.append({"workload": workload, "stage": stage, **r})
            print(f"| {workload} | {stage} | {r['median_step_s']:.3f} | {r['median_step_s'] / first['median_step_s']:.2f}x "
                  f"| {r['state_bytes_per_rank'] / 2**20:.0f} | {r['state_bytes_per_rank'] / first['state_bytes_per_rank']:.2f}x "
                  f"| {r['loaded_bytes_per_rank'] / 2**20:.0f} | "
                  f"{r['loaded_bytes_per_rank'] / first['loaded_bytes_per_rank']:.2f}x "
                  f"| {r['memory_bytes_per_rank'] / 2**20:.0f} | "
                  f"{r['memory_bytes_per_rank'] / first['memory_bytes_per_rank']:.2f}x "
                  + "".join(f"| {r[k] / 2**20:.0f} | {r[k] / first[k]:.2f}x " for k in (
                      "allocated_between_steps_bytes_per_rank", "step_adds_bytes_per_rank",
                      "allocated_peak_bytes_per_rank")) + "|", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": s, "ranks": args.ranks, "lean": args.lean, "records": records}, indent=1))


if __name__ == "__main__":
    main()
