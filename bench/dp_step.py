"""DP step cost against a non-DP DeepSpeed step: same model, same batch, one run.

Modes, each in its own process so peak memory is its own: non-DP DeepSpeed, DP ``flat``, DP
``per_layer`` (ZeRO 2 and 3), and Opacus' GradSampleModule with hooks and with ghost clipping
(plain torch: Opacus has no DeepSpeed integration). Prints a table of median step time and peak
memory with ratios to the non-DP step of the same stage, and writes JSON with ``--json PATH``.

  python bench/dp_step.py --quick            # CPU, tiny BERT, under 3 minutes
  python bench/dp_step.py --wide             # CPU, width 1024 x 2 layers, batch 8 x 128 tokens
  python bench/dp_step.py                    # GPU: BERT-base size, bf16

Next to each measured ratio: the bound the arithmetic allows (bench/cost_model.py: the non-DP
step's matrix products plus the per-sample norms) and measured / bound.
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


def settings(quick: bool, wide: bool = False) -> dict:
    if wide:
        return {"hidden": 1024, "layers": 2, "heads": 16, "vocab": 8000, "batch": 8, "length": 128, "steps": 6,
                "warmup": 2, "bf16": False}
    if quick:
        return {"hidden": 128, "layers": 2, "heads": 2, "vocab": 8000, "batch": 32, "length": 64, "steps": 6,
                "warmup": 2, "bf16": False}
    return {"hidden": 768, "layers": 12, "heads": 12, "vocab": 30522, "batch": 32, "length": 128, "steps": 20,
            "warmup": 5, "bf16": True}


def build_model(s: dict):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                        num_attention_heads=s["heads"], intermediate_size=4 * s["hidden"], num_labels=2,
                        max_position_embeddings=max(512, s["length"]))
    return BertForSequenceClassification(config)


def make_batch(s: dict, device):
    import torch

    gen = torch.Generator().manual_seed(1)
    b, t = s["batch"], s["length"]
    return {"input_ids": torch.randint(1, s["vocab"], (b, t), generator=gen).to(device),
            "attention_mask": torch.ones(b, t, dtype=torch.long, device=device),
            "token_type_ids": torch.zeros(b, t, dtype=torch.long, device=device),
            "labels": torch.randint(0, 2, (b,), generator=gen).to(device),
            "sample_mask": torch.ones(b, device=device)}


def peak_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_deepspeed_mode(mode: str, stage: int, s: dict) -> dict:
    import torch

    from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
    from dist_dpc.engine.losses import sequence_classification_loss
    from dist_dpc.privacy import PrivacyConfig
    from dist_dpc.privacy.randomness import SecretKey

    world = init_distributed()
    device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(s)
    ds_config = build_ds_config({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}},
                                micro_batch_size=s["batch"], world_size=1, zero_stage=stage, lr=1e-4, weight_decay=0.0,
                                optimizer="adamw", bf16=s["bf16"])
    privacy = PrivacyConfig(enabled=mode != "non-dp", target_epsilon=None, noise_multiplier=1.0, delta=1e-7,
                            clipping="flat" if mode == "flat" else "per_layer")
    total = s["steps"] + s["warmup"]
    engine = DPEngine(model, ds_config, privacy, dataset_size=10**6, expected_batch_size=s["batch"],
                      planned_steps=total, loss_fn=sequence_classification_loss, world=world, key=SecretKey.generate())
    batch = make_batch(s, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(total):
        _sync(device)
        start = time.perf_counter()
        engine.train_step([batch], logical_batch_size=s["batch"])
        _sync(device)
        if i >= s["warmup"]:
            times.append(time.perf_counter() - start)
    methods = engine.clipper.method_summary() if engine.clipper else {}
    counts = {}
    for m in methods.values():
        for k, v in m.items():
            counts[k] = counts.get(k, 0) + v
    return {"median_step_s": statistics.median(times), "peak_memory_bytes": peak_memory_bytes(device),
            "norm_methods": counts}


def run_opacus_mode(mode: str, s: dict) -> dict:
    import torch
    from opacus import PrivacyEngine

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(s).to(device)
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
    times = []
    for i in range(s["steps"] + s["warmup"]):
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"], position_ids=position_ids).logits
        loss = criterion(logits.float(), batch["labels"])
        loss.backward()
        optimizer.step()
        _sync(device)
        if i >= s["warmup"]:
            times.append(time.perf_counter() - start)
    return {"median_step_s": statistics.median(times), "peak_memory_bytes": peak_memory_bytes(device)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def child(args) -> None:
    s = settings(args.quick, args.wide)
    if args.mode in OPACUS_MODES:
        out = run_opacus_mode(args.mode, s)
    else:
        out = run_deepspeed_mode(args.mode, args.stage, s)
    print("RESULT " + json.dumps(out), flush=True)


def run_child(mode: str, stage: int, quick: bool, timeout: int, wide: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda"))
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--stage", str(stage)] + (["--quick"] if quick else []) \
        + (["--wide"] if wide else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{mode} (ZeRO {stage}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


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
    parser.add_argument("--stages", default="2,3", help="ZeRO stages to measure (comma separated)")
    parser.add_argument("--json", help="write the records to this JSON file")
    parser.add_argument("--skip-opacus", action="store_true", help="measure only the DeepSpeed modes")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    s = settings(args.quick, args.wide)
    timeout = 600 if args.quick or args.wide else 1800
    shape = Shape(batch=s["batch"], length=s["length"], hidden=s["hidden"], layers=s["layers"],
                  intermediate=4 * s["hidden"], heads=s["heads"])
    stages = [int(x) for x in args.stages.split(",")]
    opacus = {} if args.skip_opacus else {m: run_child(m, 0, args.quick, timeout, args.wide) for m in OPACUS_MODES}
    records = []
    for stage in stages:
        measured = {m: run_child(m, stage, args.quick, timeout, args.wide) for m in DS_MODES}
        measured.update(opacus)
        base = measured["non-dp"]
        for mode, r in measured.items():
            records.append({"zero_stage": stage, "mode": mode, "median_step_s": r["median_step_s"],
                            "peak_memory_bytes": r["peak_memory_bytes"],
                            "step_time_ratio": r["median_step_s"] / base["median_step_s"],
                            "peak_memory_ratio": r["peak_memory_bytes"] / base["peak_memory_bytes"],
                            "samples_per_s": s["batch"] / r["median_step_s"],
                            "norm_methods": r.get("norm_methods", {}),
                            "bound_ratio": bound_ratio(shape, mode)})
            rec = records[-1]
            rec["measured_over_bound"] = (rec["step_time_ratio"] / rec["bound_ratio"]
                                          if rec["bound_ratio"] is not None else None)
    header = (f"{'ZeRO':>4}  {'mode':<13} {'step (ms)':>10} {'x non-DP':>9} {'bound':>6} {'/bound':>7} {'peak MB':>9} "
              f"{'x non-DP':>9} {'samples/s':>10}")
    print(f"\nDP step benchmark - {platform.node()} {'GPU' if _has_cuda() else 'CPU'}, {time.strftime('%Y-%m-%d')}, "
          f"BERT hidden {s['hidden']} x {s['layers']} layers, batch {s['batch']} x {s['length']} tokens, "
          f"{'bf16' if s['bf16'] else 'fp32'}; Opacus runs plain torch (no ZeRO)")
    print(header)
    for r in records:
        bound = "" if r["bound_ratio"] is None else f"{r['bound_ratio']:.3f}"
        over = "" if r["measured_over_bound"] is None else f"{r['measured_over_bound']:.3f}"
        print(f"{r['zero_stage']:>4}  {r['mode']:<13} {r['median_step_s'] * 1e3:>10.1f} {r['step_time_ratio']:>9.2f} "
              f"{bound:>6} {over:>7} {r['peak_memory_bytes'] / 2**20:>9.0f} {r['peak_memory_ratio']:>9.2f} "
              f"{r['samples_per_s']:>10.1f}")
    costs = step_costs(shape)
    print(f"cost model: non-DP {costs['non_dp_flops'] / 1e9:.1f} GFLOP/step, norms {costs['norm_flops'] / 1e9:.2f} "
          f"({costs['norm_methods']}); floor per_layer = flat (one backward) {costs['per_layer_bound']:.3f}x; "
          f"today's two-pass flat does {costs['flat_two_pass_arithmetic']:.3f}x the arithmetic")
    for stage in stages:
        by = {r["mode"]: r for r in records if r["zero_stage"] == stage}
        if "opacus-hooks" in by:
            for mode in ("flat", "per_layer"):
                print(f"ZeRO {stage}: {mode} throughput = {by[mode]['samples_per_s'] / by['opacus-hooks']['samples_per_s']:.2f}x Opacus hooks")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": s, "records": records, "cost_model": costs}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
