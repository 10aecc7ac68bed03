"""Causal-LM DP step against the non-DP step, for full fine-tuning, DP-BiTFiT and DP-LoRA: same model,
same batch, each configuration in its own process (so peak memory is its own), one run.

  python bench/causal_lm_step.py                        # SmolLM2-135M (model.name=smollm2), CPU, batch 8 x 64
  python bench/causal_lm_step.py --model tiny-llama     # seconds: checks the harness
  python bench/causal_lm_step.py --json out.json

"full": every weight but the tied input embedding / LM head (SmolLM2 ties them: a trainable tied weight
is refused); "bitfit": SmolLM2 has no biases, so its norms (RMSNorm weights); "lora": r 8, alpha 16 on
q_proj and v_proj. Prints median step time and peak RSS (CPU) or allocated memory (GPU) with the DP /
non-DP ratio of each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAINABLE = ("full", "bitfit", "lora")


def model_config(name: str, trainable: str):
    from dist_dpc.models import ModelConfig
    from dist_dpc.models.config import LoraSettings

    if trainable == "lora":
        return ModelConfig(name=name, task="causal_lm", dropout=0.0, lora=LoraSettings(r=8, alpha=16))
    return ModelConfig(name=name, task="causal_lm", dropout=0.0, freeze_embeddings=True,
                       trainable=["norm"] if trainable == "bitfit" else None)


def measure(name: str, trainable: str, private: bool, batch: int, length: int, steps: int, warmup: int) -> dict:
    import torch

    from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
    from dist_dpc.engine.losses import causal_lm_loss
    from dist_dpc.models import load_causal_lm, load_tokenizer
    from dist_dpc.privacy import PrivacyConfig
    from dist_dpc.privacy.randomness import SecretKey
    from bench.dp_step import _sync, peak_memory_bytes

    world = init_distributed()
    device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    cfg = model_config(name, trainable)
    tok = load_tokenizer(cfg, log=None)
    model = load_causal_lm(cfg, tok, seed=0)
    ds_config = build_ds_config({}, micro_batch_size=batch, world_size=1, zero_stage=0, lr=1e-4, weight_decay=0.0,
                                optimizer="adamw", bf16=False)
    privacy = PrivacyConfig(enabled=private, target_epsilon=None, noise_multiplier=1.0, delta=1e-7)
    engine = DPEngine(model, ds_config, privacy, dataset_size=10**6, expected_batch_size=batch,
                      planned_steps=steps + warmup, loss_fn=causal_lm_loss, world=world, key=SecretKey.generate())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, len(tok), (batch, length), generator=gen)
    micro = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "labels": ids.to(device), "sample_mask": torch.ones(batch, device=device)}
    times = []
    for i in range(steps + warmup):
        _sync(device)
        start = time.perf_counter()
        engine.train_step([micro], logical_batch_size=batch)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"median_step_s": statistics.median(times), "peak_memory_bytes": peak_memory_bytes(device),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json")
    p.add_argument("--child", nargs=2, metavar=("TRAINABLE", "PRIVATE"))
    a = p.parse_args()
    if a.child:
        out = measure(a.model, a.child[0], a.child[1] == "dp", a.batch, a.length, a.steps, a.warmup)
        print("RESULT " + json.dumps(out), flush=True)
        return
    from dist_dpc.models.loading import resolve_name

    resolve_name(a.model)  # convert a GGUF once, before the timed children
    rows = []
    for trainable in TRAINABLE:
        for private in ("non-dp", "dp"):
            env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
            proc = subprocess.run([sys.executable, __file__, "--model", a.model, "--batch", str(a.batch), "--length",
                                   str(a.length), "--steps", str(a.steps), "--warmup", str(a.warmup), "--child",
                                   trainable, private], capture_output=True, text=True, env=env, cwd=ROOT)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{trainable}/{private} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
            rows.append({"trainable": trainable, "mode": private, **json.loads(line[7:])})
            print(f"{trainable:<7} {private:<7} {rows[-1]['median_step_s']:8.2f} s  "
                  f"{rows[-1]['peak_memory_bytes'] / 2**20:8.0f} MiB  {rows[-1]['trainable_parameters']:>12,} trainable",
                  flush=True)
    print(f"\n{a.model}, batch {a.batch} x {a.length} tokens, median of {a.steps} steps after {a.warmup}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}")
    print(f"{'trainable':<9} {'DP / non-DP time':>17} {'DP / non-DP memory':>19}")
    for trainable in TRAINABLE:
        base, dp = [r for r in rows if r["trainable"] == trainable]
        print(f"{trainable:<9} {dp['median_step_s'] / base['median_step_s']:>16.2f}x "
              f"{dp['peak_memory_bytes'] / base['peak_memory_bytes']:>18.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "batch": a.batch, "length": a.length, "rows": rows},
                                           indent=2))


if __name__ == "__main__":
    main()
