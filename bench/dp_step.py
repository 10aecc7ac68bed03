"""DP step cost against a non-DP DeepSpeed step: same model, same batch, one run.

Modes, each in its own process so peak memory is its own: non-DP DeepSpeed, DP ``flat``, DP
``per_layer`` (ZeRO 2 and 3), and Opacus' GradSampleModule with hooks and with ghost clipping
(plain torch: Opacus has no DeepSpeed integration). Prints a table of median step time and peak
memory with ratios to the non-DP step of the same stage, and writes JSON with ``--json PATH``.

Peak memory: on a GPU torch.cuda.max_memory_allocated; on the CPU the peak RSS of two more steps with
glibc returning freed tensors to the OS (``host_peak_without_retention``; the plain ru_maxrss, which
also counts what the allocator kept, is in the JSON as ``peak_rss_default_malloc_bytes``), and
``model_memory_ratio``: what each mode adds to the process before its model is built, over the same
for the non-DP step (the code and libraries, about 1 GB in every mode, dilute the plain ratio).

  python bench/dp_step.py --quick            # CPU, tiny BERT, under 3 minutes
  python bench/dp_step.py --wide             # CPU, width 1024 x 2 layers, batch 8 x 128 tokens
  python bench/dp_step.py --wide --models bert,gpt2,llama --worlds 1,2    # causal LMs, 2 ranks (gloo)
  python bench/dp_step.py --models bert,gpt2,llama                        # GPU: BERT-base, GPT-2-medium, 1B Llama, bf16

Next to each measured ratio: the bound the arithmetic allows (bench/cost_model.py: the non-DP
step's matrix products plus the per-sample norms) and measured / bound.

How far the batch can grow (``--batch-capacity``): each mode is measured again, memory only, at two
larger batches (``--capacity-batches``, multiples of the shape's batch; default 4 and 8), its peak
fitted through them as fixed + per_sample x batch, and the largest batch that fits a memory budget
extrapolated (``--memory-budget-gib``; default the GPU's memory, on the CPU this machine's RAM, a
stand-in): records gain per_sample_memory_bytes, max_batch and max_batch_ratio (to the non-DP
step's). At small batches the peak is the optimizer step's (weights, gradients, Adam state: the
same at any batch), so a fit there says nothing; a fit whose peak grows by less than 5 % between the
two batches is reported as not in the linear regime (max_batch null).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DS_MODES = ("non-dp", "flat", "per_layer")

from cost_model import Shape, bound_ratio, step_costs  # noqa: E402  (bench/ is on sys.path as the script's dir)
OPACUS_MODES = ("opacus-hooks", "opacus-ghost")


def settings(quick: bool, wide: bool = False, model: str = "bert", bf16: bool = False) -> dict:
    """The shapes: quick (CPU, minutes), wide (CPU: width 1024, T 128), else the GPU shape of the
    family: BERT-base, GPT-2-medium, a 1B Llama (Llama-3.2-1B's widths)."""
    if wide:
        s = {"hidden": 1024, "layers": 2, "heads": 16, "vocab": 8000, "batch": 8, "length": 128, "steps": 10,
             "warmup": 2, "bf16": False}
    elif quick:
        s = {"hidden": 128, "layers": 2, "heads": 2, "vocab": 8000, "batch": 32, "length": 64, "steps": 6,
             "warmup": 2, "bf16": False}
    elif model == "gpt2":  # GPT-2-medium
        s = {"hidden": 1024, "layers": 24, "heads": 16, "vocab": 50257, "batch": 16, "length": 256, "steps": 10,
             "warmup": 3, "bf16": True}
    elif model == "llama":  # 1B Llama
        s = {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 128256,
             "batch": 8, "length": 256, "steps": 10, "warmup": 3, "bf16": True}
    else:  # BERT-base
        s = {"hidden": 768, "layers": 12, "heads": 12, "vocab": 30522, "batch": 32, "length": 128, "steps": 20,
             "warmup": 5, "bf16": True}
    s.setdefault("intermediate", 4 * s["hidden"])
    s["bf16"] = s["bf16"] or bf16
    if model == "llama":
        s.setdefault("kv_heads", max(1, s["heads"] // 4))
    return {**s, "model": model}


def shape_of(s: dict) -> Shape:
    return Shape(batch=s["batch"], length=s["length"], hidden=s["hidden"], layers=s["layers"],
                 intermediate=s["intermediate"], heads=s["heads"], family=s["model"],
                 vocab=s["vocab"] if s["model"] != "bert" else 0, kv_heads=s.get("kv_heads"))


def build_model(s: dict):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, \
        LlamaForCausalLM

    torch.manual_seed(0)
    if s["model"] == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=s["vocab"], n_embd=s["hidden"], n_layer=s["layers"],
                                          n_head=s["heads"], n_inner=s["intermediate"], n_positions=max(1024, s["length"]),
                                          tie_word_embeddings=False))
    if s["model"] == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                                            num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                                            intermediate_size=s["intermediate"], tie_word_embeddings=False,
                                            max_position_embeddings=max(2048, s["length"])))
    config = BertConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                        num_attention_heads=s["heads"], intermediate_size=s["intermediate"], num_labels=2,
                        max_position_embeddings=max(512, s["length"]))
    return BertForSequenceClassification(config)


def make_batch(s: dict, device):
    import torch

    gen = torch.Generator().manual_seed(1)
    b, t = s["batch"], s["length"]
    ids = torch.randint(1, s["vocab"], (b, t), generator=gen)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones(b, t, dtype=torch.long, device=device),
             "sample_mask": torch.ones(b, device=device)}
    if s["model"] != "bert":  # causal LM: every position predicts the next token
        return {**batch, "labels": ids.to(device)}
    return {**batch, "token_type_ids": torch.zeros(b, t, dtype=torch.long, device=device),
            "labels": torch.randint(0, 2, (b,), generator=gen).to(device)}


def peak_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def host_peak_without_retention(step, steps: int = 2) -> int | None:
    """Peak RSS of ``steps`` more steps with glibc returning every freed tensor to the OS, or None
    where that cannot be set up (not glibc, or /proc/self/clear_refs not writable).

    The plain peak RSS (ru_maxrss) also counts memory that glibc keeps after a tensor is freed: its
    mmap threshold rises to the largest block freed so far (up to 32 MiB), after which such blocks
    come from heaps that are trimmed only at their top, so RSS reflects the order of allocations, not
    what a step needs. Here, after the timed steps (whose times this does not touch), the threshold is
    fixed at 64 KiB (every tensor above it is its own mapping, unmapped when freed), free heap memory is
    returned (malloc_trim), the kernel's high-water mark is reset (clear_refs 5), and the steps are run
    again: the resulting peak is that of the live allocations, as torch.cuda.max_memory_allocated is
    on a GPU (plus the process's code and libraries, in every mode alike)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        if libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024) != 1:
            return None
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    for _ in range(steps):
        step()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def memory_fields(device, rss_before_model: int, step) -> dict:
    """The record's memory: on a GPU the allocator's peak; on the CPU the peak without allocator
    retention (the plain one if that cannot be set up), the plain peak RSS and the RSS before the
    model. Called after the timed steps; ``step`` runs one more step."""
    peak = peak_memory_bytes(device)
    if device.type != "cpu":
        return {"peak_memory_bytes": peak}
    return {"peak_rss_default_malloc_bytes": peak, "rss_before_model_bytes": rss_before_model,
            "peak_memory_bytes": host_peak_without_retention(step) or peak}


def run_deepspeed_mode(mode: str, stage: int, s: dict) -> dict:
    import torch

    from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
    from dist_dpc.engine.losses import causal_lm_loss, sequence_classification_loss
    from dist_dpc.models import dp_layers  # noqa: F401  (the DP rules of GPT-2's Conv1D and Llama's RMSNorm)
    from dist_dpc.privacy import PrivacyConfig
    from dist_dpc.privacy.randomness import SecretKey

    world = init_distributed()
    device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    rss0 = _rss_bytes()  # the process before the model: code, libraries, the process group
    with device:  # built where it runs: a 1B model's random init on the host would dominate a GPU run
        model = build_model(s)
    ds_config = build_ds_config({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}},
                                micro_batch_size=s["batch"], world_size=world.world_size, zero_stage=stage, lr=1e-4,
                                weight_decay=0.0,
                                optimizer="adamw", bf16=s["bf16"])
    privacy = PrivacyConfig(enabled=mode != "non-dp", target_epsilon=None, noise_multiplier=1.0, delta=1e-7,
                            clipping="flat" if mode == "flat" else "per_layer")
    total = s["steps"] + s["warmup"]
    engine = DPEngine(model, ds_config, privacy, dataset_size=10**6, expected_batch_size=s["batch"],
                      planned_steps=total + 2, world=world, key=SecretKey.from_seed(0),  # the bench's noise needs no secret
                      loss_fn=sequence_classification_loss if s["model"] == "bert" else causal_lm_loss)
    batch = make_batch(s, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(total):
        _sync(device)
        start = time.perf_counter()
        engine.train_step([batch], logical_batch_size=s["batch"] * world.world_size)
        _sync(device)
        if i >= s["warmup"]:
            times.append(time.perf_counter() - start)
    out_memory = memory_fields(device, rss0,
                               lambda: engine.train_step([batch], logical_batch_size=s["batch"] * world.world_size))
    methods = engine.clipper.method_summary() if engine.clipper else {}
    counts = {}
    for m in methods.values():
        for k, v in m.items():
            counts[k] = counts.get(k, 0) + v
    out = {"median_step_s": statistics.median(times), **out_memory, "norm_methods": counts}
    if mode != "non-dp":
        # At ZeRO >= 1 each rank draws the noise of its own partition only (1/world of the model).
        out["noise_s"] = time_noise(model, device, world.world_size if stage >= 1 else 1, engine.noise_on_device)
        out["noise_sampler"] = "device" if engine.noise_on_device else "host"
    return out


def time_noise(model, device, shards: int = 1, on_device: bool = False) -> float:
    """Seconds to draw one step's Gaussian noise for this rank's share of the trainable coordinates
    (fp32; 1/shards of the model: at ZeRO >= 1 a rank noises its own partition), timed on its own
    with the engine's sampler: the host draw (privacy.randomness.add_gaussian_) plus the copy to the
    device, or the draw on the device (add_gaussian_cuda_)."""
    import torch

    from dist_dpc.privacy.randomness import SecretKey, add_gaussian_

    numel = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters() if p.requires_grad)
    numel = -(-numel // shards)
    target = torch.zeros(numel, dtype=torch.float32, device=device)
    key = SecretKey.from_seed(1)
    add_gaussian_(target, 1.0, key, "warm-up", on_device=on_device)
    _sync(device)
    start = time.perf_counter()
    add_gaussian_(target, 1.0, key, "timed", on_device=on_device)
    _sync(device)
    return time.perf_counter() - start


def run_opacus_mode(mode: str, s: dict) -> dict:
    import torch
    from opacus import PrivacyEngine

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rss0 = _rss_bytes()
    with device:
        model = build_model(s)
    if s["bf16"]:
        model = model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = make_batch(s, device)
    # Opacus needs per-sample position ids (a (1, T) buffer gives per-sample grads of the wrong batch size).
    position_ids = torch.arange(s["length"], device=device).repeat(s["batch"], 1).contiguous()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(batch["input_ids"]), batch_size=s["batch"])
    criterion = torch.nn.CrossEntropyLoss()
    engine = PrivacyEngine()
    kwargs = {"grad_sample_mode": "ghost", "criterion": criterion} if mode == "opacus-ghost" else {}
    made = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                               max_grad_norm=1.0, poisson_sampling=False, **kwargs)
    model, optimizer = made[0], made[1]
    criterion = made[2] if mode == "opacus-ghost" else criterion
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    def step():
        optimizer.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"], position_ids=position_ids).logits
        loss = criterion(logits.float(), batch["labels"])
        loss.backward()
        optimizer.step()

    times = []
    for i in range(s["steps"] + s["warmup"]):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if i >= s["warmup"]:
            times.append(time.perf_counter() - start)
    return {"median_step_s": statistics.median(times), **memory_fields(device, rss0, step)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def child(args) -> None:
    s = settings(args.quick, args.wide, args.model, args.bf16)
    if args.batch:
        s["batch"] = args.batch
    if args.memory_only:  # the capacity fit reads only the peak: one timed step after one warm-up
        s["steps"], s["warmup"] = 1, 1
    if args.mode in OPACUS_MODES:
        out = run_opacus_mode(args.mode, s)
    else:
        out = run_deepspeed_mode(args.mode, args.stage, s)
    if int(os.environ.get("RANK", "0")) == 0:  # every rank times the same collective step; rank 0 reports
        print("RESULT " + json.dumps(out), flush=True)


def run_child(mode: str, stage: int, quick: bool, timeout: int, wide: bool = False, model: str = "bert",
              world: int = 1, bf16: bool = False, batch: int | None = None, memory_only: bool = False) -> dict:
    """One mode in its own process (or ``world`` ranks under torchrun: gloo on CPU, NCCL on GPUs)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda"))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    args = ["--child", "--mode", mode, "--stage", str(stage), "--model", model] + (["--quick"] if quick else []) \
        + (["--wide"] if wide else []) + (["--bf16"] if bf16 else []) + (["--batch", str(batch)] if batch else []) \
        + (["--memory-only"] if memory_only else [])
    if world > 1:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(port), __file__, *args]
    else:
        cmd = [sys.executable, __file__, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{mode} (ZeRO {stage}, {model}, world {world}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU-sized model and few steps (under 3 minutes)")
    parser.add_argument("--wide", action="store_true", help="the wide CPU shape: width 1024, 2 layers, 8 x 128 tokens")
    parser.add_argument("--models", default="bert", help="bert (classifier), gpt2, llama (causal LMs); comma separated")
    parser.add_argument("--stages", default="2,3", help="ZeRO stages to measure (comma separated)")
    parser.add_argument("--worlds", default="1", help="ranks per measurement (comma separated; 2: torchrun, per-rank batch)")
    parser.add_argument("--json", help="write the records to this JSON file")
    parser.add_argument("--skip-opacus", action="store_true", help="measure only the DeepSpeed modes")
    parser.add_argument("--bf16", action="store_true", help="bf16 on every shape (the GPU shapes always are)")
    parser.add_argument("--child-timeout", type=int, help="seconds per measured process (default 600 on the CPU "
                        "shapes, 1800 on the GPU ones)")
    parser.add_argument("--batch-capacity", action="store_true",
                        help="also measure each mode at two larger batches and extrapolate the largest batch that fits")
    parser.add_argument("--capacity-batches", default="4,8",
                        help="the two multiples of the shape's batch that --batch-capacity fits through")
    parser.add_argument("--memory-budget-gib", type=float,
                        help="memory budget of --batch-capacity (default: the GPU's memory; on the CPU this machine's RAM)")
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="bert", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    timeout = args.child_timeout or (600 if args.quick or args.wide else 1800)
    stages = [int(x) for x in args.stages.split(",")]
    worlds = [int(x) for x in args.worlds.split(",")]
    records, all_settings, costs_by_model = [], {}, {}
    failures = []
    for model in args.models.split(","):
        s = settings(args.quick, args.wide, model, args.bf16)
        shape = shape_of(s)
        all_settings[model], costs_by_model[model] = s, step_costs(shape)

        def measure(mode: str, stage: int, world: int = 1, batch: int | None = None):
            """One mode's result, or None with the failure kept (one failed mode never loses the rest)."""
            try:
                return run_child(mode, stage, args.quick, timeout, args.wide, model, world, args.bf16, batch,
                                 memory_only=batch is not None)
            except Exception as err:  # noqa: BLE001  (a timeout or a crash: recorded, the bench goes on)
                failures.append({"model": model, "world": world, "zero_stage": stage, "mode": mode,
                                 "error": str(err)[-3000:]})
                print(f"FAILED {model} {mode} ZeRO {stage} world {world}: {str(err)[-600:]}", flush=True)
                return None

        # Opacus (plain torch, one process) only where its grad samplers cover the model: BERT's Linear,
        # Embedding and LayerNorm; GPT-2's Conv1D and Llama's RMSNorm have none.
        opacus = {} if args.skip_opacus or model != "bert" else {m: measure(m, 0) for m in OPACUS_MODES}
        modes = list(DS_MODES)
        for world in worlds:
            for stage in stages:
                measured = {m: measure(m, stage, world) for m in modes}
                if world == 1:
                    measured.update(opacus)
                base = measured["non-dp"]
                for mode, r in measured.items():
                    if r is None or base is None:
                        continue
                    rec = {"model": model, "world": world, "zero_stage": stage, "mode": mode,
                           "precision": "bf16" if s["bf16"] else "fp32",
                           "median_step_s": r["median_step_s"], "peak_memory_bytes": r["peak_memory_bytes"],
                           "step_time_ratio": r["median_step_s"] / base["median_step_s"],
                           "peak_memory_ratio": r["peak_memory_bytes"] / base["peak_memory_bytes"],
                           "samples_per_s": s["batch"] * world / r["median_step_s"],
                           "norm_methods": r.get("norm_methods", {}), "bound_ratio": bound_ratio(shape, mode),
                           "noise_s": r.get("noise_s"), "noise_sampler": r.get("noise_sampler")}
                    if r.get("peak_rss_default_malloc_bytes") is not None:
                        # CPU: the plain peak RSS too (glibc's retention included), and the ratio of what each
                        # mode adds to the process before its model (code and libraries dilute the plain ratio).
                        rec["peak_rss_default_malloc_bytes"] = r["peak_rss_default_malloc_bytes"]
                        rec["peak_rss_default_malloc_ratio"] = (r["peak_rss_default_malloc_bytes"]
                                                                / base["peak_rss_default_malloc_bytes"])
                        rec["model_memory_ratio"] = ((r["peak_memory_bytes"] - r["rss_before_model_bytes"])
                                                     / (base["peak_memory_bytes"] - base["rss_before_model_bytes"]))
                    rec["measured_over_bound"] = (rec["step_time_ratio"] / rec["bound_ratio"]
                                                  if rec["bound_ratio"] is not None else None)
                    # The noise draw is O(parameters) per step, outside the FLOP model: measured on its
                    # own, in units of the non-DP step, and added to the floor.
                    if rec["bound_ratio"] is not None and rec["noise_s"] is not None:
                        rec["noise_share"] = rec["noise_s"] / base["median_step_s"]
                        rec["bound_with_noise"] = rec["bound_ratio"] + rec["noise_share"]
                        rec["measured_over_bound_with_noise"] = rec["step_time_ratio"] / rec["bound_with_noise"]
                    records.append(rec)
                if args.batch_capacity:
                    batches = [int(k) * s["batch"] for k in args.capacity_batches.split(",")]
                    add_batch_capacity([r for r in records if r["model"] == model and r["world"] == world
                                        and r["zero_stage"] == stage], batches, memory_budget(args),
                                       lambda mode, batch: measure(mode, 0 if mode in OPACUS_MODES else stage, world,
                                                                   batch))
                if args.json:  # after every stage: a run cut short keeps what it measured
                    write_json(args.json, records, all_settings, costs_by_model, failures)
    device = "GPU" if _has_cuda() else "CPU"
    print(f"\nDP step benchmark - {platform.node()} {device}, {time.strftime('%Y-%m-%d')}; ratios to the non-DP step "
          "of the same model, world and stage, measured side by side; Opacus runs plain torch (no ZeRO), one process")
    print(f"{'model':<6} {'world':>5} {'ZeRO':>4}  {'mode':<13} {'step (ms)':>10} {'x non-DP':>9} {'bound':>6} "
          f"{'/bound':>7} {'peak MB':>9} {'x non-DP':>9} {'model x':>8} {'rss x':>6} {'samples/s':>10} {'noise (ms)':>10} "
          f"{'+noise':>7} {'/+noise':>8}")
    for r in records:
        bound = "" if r["bound_ratio"] is None else f"{r['bound_ratio']:.3f}"
        over = "" if r["measured_over_bound"] is None else f"{r['measured_over_bound']:.3f}"
        print(f"{r['model']:<6} {r['world']:>5} {r['zero_stage']:>4}  {r['mode']:<13} {r['median_step_s'] * 1e3:>10.1f} "
              f"{r['step_time_ratio']:>9.2f} {bound:>6} {over:>7} {r['peak_memory_bytes'] / 2**20:>9.0f} "
              f"{r['peak_memory_ratio']:>9.2f} {format(r['model_memory_ratio'], '.2f') if 'model_memory_ratio' in r else '':>8} "
              f"{format(r['peak_rss_default_malloc_ratio'], '.2f') if 'model_memory_ratio' in r else '':>6} "
              f"{r['samples_per_s']:>10.1f} "
              f"{'' if r['noise_s'] is None else format(r['noise_s'] * 1e3, '.1f'):>10} "
              f"{format(r['bound_with_noise'], '.3f') if 'bound_with_noise' in r else '':>7} "
              f"{format(r['measured_over_bound_with_noise'], '.3f') if 'bound_with_noise' in r else '':>8}")
    for model, s in all_settings.items():
        c = costs_by_model[model]
        print(f"{model}: hidden {s['hidden']} x {s['layers']} layers, batch {s['batch']} x {s['length']} tokens per rank, "
              f"{'bf16' if s['bf16'] else 'fp32'}; cost model: non-DP {c['non_dp_flops'] / 1e9:.1f} GFLOP/step, norms "
              f"{c['norm_flops'] / 1e9:.2f} ({c['norm_methods']}); floor per_layer = flat (one backward) "
              f"{c['per_layer_bound']:.3f}x")
    for r in records:
        if r["mode"] in ("flat", "per_layer") and r["world"] == 1:
            ref = next((o for o in records if o["mode"] == "opacus-ghost" and o["model"] == r["model"]
                        and o["zero_stage"] == r["zero_stage"] and o["world"] == 1), None)
            if ref is not None:
                print(f"{r['model']} ZeRO {r['zero_stage']}: {r['mode']} throughput = "
                      f"{r['samples_per_s'] / ref['samples_per_s']:.2f}x Opacus ghost clipping")
    if args.batch_capacity:
        print(f"\nBatch capacity (peak fitted through batches {args.capacity_batches} x B, per rank; budget "
              f"{memory_budget(args) / 2**30:.1f} GiB; '-': the peak grew < 5 %, not the linear regime)")
        print(f"{'model':<6} {'world':>5} {'ZeRO':>4}  {'mode':<13} {'fixed MB':>9} {'MB/sample':>10} {'max batch':>10} "
              f"{'x non-DP':>9}")
        for r in records:
            if "per_sample_memory_bytes" in r:
                print(f"{r['model']:<6} {r['world']:>5} {r['zero_stage']:>4}  {r['mode']:<13} "
                      f"{r['fixed_memory_bytes'] / 2**20:>9.0f} {r['per_sample_memory_bytes'] / 2**20:>10.2f} "
                      f"{r['max_batch'] if r['max_batch'] is not None else '-':>10} "
                      f"{format(r['max_batch_ratio'], '.2f') if r.get('max_batch_ratio') else '':>9}")
    for f in failures:
        print(f"FAILED: {f['model']} {f['mode']} ZeRO {f['zero_stage']} world {f['world']} (error in the JSON)")
    if args.json:
        write_json(args.json, records, all_settings, costs_by_model, failures)
        print(f"wrote {args.json}")
    if failures:
        sys.exit(1)


def memory_budget(args) -> int:
    """Bytes the capacity fit may fill: the flag, else the GPU's memory, else this machine's RAM."""
    if args.memory_budget_gib:
        return int(args.memory_budget_gib * 2**30)
    if _has_cuda():
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def add_batch_capacity(stage_records: list, batches: list[int], budget: int, measure_at) -> None:
    """Per record: its peak measured now at two larger batches gives fixed + per_sample x batch; the
    largest batch under ``budget`` follows, and its ratio to the non-DP step's. Linear in the batch once
    activations, per-sample norms and book-keeping tensors (all growing with it) set the peak; below
    that the optimizer step's batch-independent peak hides them, and the record says so."""
    small, large = batches
    for rec in stage_records:
        peaks = [measure_at(rec["mode"], small), measure_at(rec["mode"], large)]
        if any(p is None for p in peaks):
            continue
        low, high = (p["peak_memory_bytes"] for p in peaks)
        per_sample = (high - low) / (large - small)
        linear = high >= 1.05 * low
        fixed = low - per_sample * small
        rec.update({"capacity_batches": batches, "capacity_peaks_bytes": [low, high],
                    "per_sample_memory_bytes": per_sample, "fixed_memory_bytes": fixed, "memory_budget_bytes": budget,
                    "capacity_linear": linear,
                    "max_batch": int((budget - fixed) // per_sample) if linear and per_sample > 0 else None})
    base = next((r for r in stage_records if r["mode"] == "non-dp" and r.get("max_batch")), None)
    for rec in stage_records:
        if base is not None and rec.get("max_batch"):
            rec["max_batch_ratio"] = rec["max_batch"] / base["max_batch"]


def write_json(path: str, records: list, all_settings: dict, costs_by_model: dict, failures: list) -> None:
    Path(path).write_text(json.dumps({"device": _device_name(), "date": time.strftime("%Y-%m-%d %H:%M"),
                                      "settings": all_settings, "records": records, "cost_model": costs_by_model,
                                      "failures": failures}, indent=2))


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if _has_cuda() else f"CPU ({os.cpu_count()} cores, {platform.node()})"


if __name__ == "__main__":
    main()
