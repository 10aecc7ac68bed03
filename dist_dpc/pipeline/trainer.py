"""The shared training loop: data -> model -> DP engine -> steps -> evaluation -> results.

Phases are configs run through this one loop; the DP step itself lives in dist_dpc.engine.dp_engine.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from dist_dpc.data import check_labels, collate, load_task, tokenize_split
from dist_dpc.engine import DPEngine, build_ds_config, init_distributed
from dist_dpc.engine.losses import model_inputs, sequence_classification_loss
from dist_dpc.models import load_sequence_classifier, load_tokenizer
from dist_dpc.pipeline.checkpoints import Checkpoints
from dist_dpc.pipeline.config import Config
from dist_dpc.pipeline.run_dir import RunDir
from dist_dpc.privacy.sampling import make_sampler
from dist_dpc.utils.config_loader import dump_yaml, to_dict
from dist_dpc.utils.progress import Progress
from dist_dpc.utils.tracking import make_tracker
from dist_dpc.utils.logging import log, warn_loudly


def planned_steps(cfg: Config, steps_per_epoch: int) -> int:
    steps = max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def run_train(cfg: Config, phase: str = "train") -> dict:
    world = init_distributed()
    run_dir = RunDir.prepare(cfg, world)
    if world.is_main:
        dump_yaml(cfg, run_dir.path / "config.yaml")
    torch.distributed.barrier()

    tokenizer = load_tokenizer(cfg.model)
    task = load_task(cfg.data)
    log(world, f"data: {task.source}; train {len(task.train.labels)} examples, "
               + ", ".join(f"{k} {len(v.labels)}" for k, v in task.eval.items()))
    num_labels = cfg.model.num_labels or task.num_labels
    for split in [task.train, *task.eval.values()]:
        check_labels(split, num_labels)
    cache = run_dir.path / "cache"
    train_set = tokenize_split(task.train, tokenizer, cfg.data.max_length, cache_dir=cache)
    eval_sets = {k: tokenize_split(v, tokenizer, cfg.data.max_length, cache_dir=cache) for k, v in task.eval.items()}
    model = load_sequence_classifier(cfg.model, num_labels, tokenizer, seed=cfg.run.seed)

    privacy = cfg.privacy
    if not privacy.enabled:
        warn_loudly(world, "privacy.enabled=false: training WITHOUT differential privacy; the model may leak its data")
    seed = run_dir.noise_seed(privacy.noise_seed)
    sampling = privacy.sampling if privacy.enabled else "shuffle"
    sampler = make_sampler(sampling, dataset_size=len(train_set), expected_batch_size=cfg.train.batch_size,
                           micro_batch_size=cfg.train.micro_batch_size, rank=world.rank,
                           world_size=world.world_size, seed=seed)
    if privacy.enabled and sampling != "poisson":
        warn_loudly(world, "privacy.sampling=shuffle: the accountant's epsilon assumes Poisson sampling; "
                           "the reported epsilon is not a proven bound for fixed-size shuffled batches")
    steps = planned_steps(cfg, sampler.steps_per_epoch())
    ds_config = build_ds_config(cfg.train.deepspeed_config, micro_batch_size=cfg.train.micro_batch_size,
                                world_size=world.world_size, zero_stage=cfg.train.zero_stage, lr=cfg.train.lr,
                                weight_decay=cfg.train.weight_decay, optimizer=cfg.train.optimizer,
                                bf16=cfg.train.bf16, dp_enabled=privacy.enabled)
    engine = DPEngine(model, ds_config, privacy, dataset_size=len(train_set),
                      expected_batch_size=cfg.train.batch_size, planned_steps=steps,
                      loss_fn=sequence_classification_loss, world=world, seed=seed,
                      poisson_sampling=(sampling == "poisson"))
    if privacy.enabled:
        log(world, f"DP-SGD: sigma={engine.noise_multiplier:.4f} q={engine.sample_rate:.5f} steps={steps} "
                   f"delta={engine.delta:.3g} C={privacy.max_grad_norm} clipping={privacy.clipping} "
                   f"sampling={sampling} accountant={privacy.accountant} zero_stage={engine.ds.zero_optimization_stage()} "
                   f"world={world.world_size}")

    checkpoints = Checkpoints(run_dir.path / "checkpoints", keep=cfg.train.keep_checkpoints, world=world)
    if checkpoints.latest() is not None:
        checkpoints.load(engine)
        spent = f", epsilon so far {engine.epsilon():.3f}" if privacy.enabled else ""
        log(world, f"resumed from {checkpoints.latest()} at step {engine.steps_done}/{steps}{spent}")
    tracker = make_tracker(cfg.wandb, world=world, run_dir=run_dir.path, group=cfg.run.name, phase=phase,
                           config=to_dict(cfg))
    pad_id = tokenizer.pad_token_id
    start = time.perf_counter()
    progress = Progress(world, total=steps, initial=engine.steps_done, desc=phase)
    for step in range(engine.steps_done, steps):
        plan = sampler.plan(step)
        micro = [collate([train_set[i] for i in idx], pad_id, num_rows=cfg.train.micro_batch_size)
                 for idx in plan.micro_batches]
        step_start = time.perf_counter()
        stats = engine.train_step(micro, plan.logical_batch_size)
        seconds = time.perf_counter() - step_start
        progress.update()
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == steps:
            metrics = step_metrics(engine, stats, micro, seconds)
            tracker.log(metrics, step=step + 1)
            progress.report(step + 1, metrics, time.perf_counter() - start)
        if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0 and step + 1 < steps:
            checkpoints.save(engine)
    progress.close()

    metrics = {name: evaluate(engine, data, pad_id, cfg.train.eval_batch_size) for name, data in eval_sets.items()}
    results = {
        "metrics": metrics,
        "steps": steps,
        "private": privacy.enabled,
        "epsilon": engine.epsilon() if privacy.enabled else None,
        "epsilon_rdp": engine.epsilon(other_accountant(engine)) if privacy.enabled else None,
        "delta": engine.delta if privacy.enabled else None,
        "noise_multiplier": engine.noise_multiplier,
        "sample_rate": engine.sample_rate,
        "accountant": privacy.accountant,
        "sampling": sampling,
        "dataset_size": len(train_set),
        "train_seconds": time.perf_counter() - start,
        "norm_methods": engine.clipper.method_summary() if engine.clipper else {},
    }
    save_model(engine, run_dir.path / "model", tokenizer, world)
    params = sum(p.numel() for p in model_parameters(engine))
    tracker.log({f"eval/{split}/{k}": v for split, m in metrics.items() for k, v in m.items()} | {"eval/parameters": params},
                step=steps)
    if privacy.enabled:
        tracker.summary({"final_epsilon": results["epsilon"], "final_epsilon_rdp": results["epsilon_rdp"],
                         "delta": results["delta"], "noise_multiplier": engine.noise_multiplier,
                         "sample_rate": engine.sample_rate})
        rows = [[phase, m.noise_multiplier, m.sample_rate, m.steps, results["epsilon"]] for m in engine.accountant.history]
        tracker.table("privacy_ledger", ["phase", "noise_multiplier", "sample_rate", "steps", "epsilon_total"], rows)
    tracker.artifact(run_dir.path / "model", name=f"{cfg.run.name}-{phase}-model", kind="model",
                     metadata={"epsilon": results["epsilon"], "delta": results["delta"], "private": privacy.enabled,
                               "accountant": privacy.accountant, "sampling": sampling, "phase": phase})
    if world.is_main:
        run_dir.write_json("results.json", results)
        summary(world, results)
    tracker.finish()
    torch.distributed.barrier()
    return results


def step_metrics(engine: DPEngine, stats, micro: list[dict], seconds: float) -> dict:
    """What a DP run is watched by: loss next to the privacy spent, clipping and throughput."""
    tokens = sum(int((m["attention_mask"].sum(1) * m["sample_mask"]).sum()) for m in micro)
    out = {"train/loss": stats.loss, "train/lr": engine.ds.get_lr()[0],
           "train/expected_batch_size": engine.expected_batch_size, "train/batch_size": stats.logical_batch_size,
           "perf/samples_per_s": stats.logical_batch_size / seconds, "perf/tokens_per_s_rank0": tokens / seconds,
           "perf/peak_memory_mb": peak_memory_mb()}
    if engine.clipper is not None:
        out.update({"privacy/epsilon": engine.epsilon(), "privacy/epsilon_" + other_accountant(engine): engine.epsilon(other_accountant(engine)),
                    "privacy/noise_multiplier": engine.noise_multiplier, "privacy/sample_rate": engine.sample_rate,
                    "privacy/clipped_fraction": stats.clipped_fraction})
        out.update({f"privacy/grad_norm_{k}": v for k, v in stats.grad_norm_quantiles.items()})
    return out


def other_accountant(engine: DPEngine) -> str:
    return "rdp" if engine.privacy.accountant == "prv" else "prv"


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_parameters(engine: DPEngine):
    """Parameters with their full sizes (ZeRO-3 keeps the numel of a partitioned one in ds_numel)."""
    for p in engine.module.parameters():
        yield torch.empty(getattr(p, "ds_numel", p.numel()), device="meta")


@torch.no_grad()
def evaluate(engine: DPEngine, data, pad_id: int, batch_size: int) -> dict:
    """Accuracy (and macro F1 for two classes) on a split; every rank runs it (ZeRO-3 needs them all)."""
    engine.ds.eval()
    preds, labels = [], []
    for i in range(0, len(data), batch_size):
        batch = collate([data[j] for j in range(i, min(i + batch_size, len(data)))], pad_id)
        batch = {k: v.to(engine.ds.device) for k, v in batch.items()}
        logits = engine.ds(**model_inputs(batch)).logits
        preds.append(logits.argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
    engine.ds.train()
    p, y = torch.cat(preds), torch.cat(labels)
    out = {"accuracy": float((p == y).float().mean()), "examples": int(len(y))}
    if int(y.max()) <= 1 and int(p.max()) <= 1:
        tp = int(((p == 1) & (y == 1)).sum())
        fp = int(((p == 1) & (y == 0)).sum())
        fn = int(((p == 0) & (y == 1)).sum())
        out["f1"] = 2 * tp / max(1, 2 * tp + fp + fn)
    return out


def save_model(engine: DPEngine, directory: Path, tokenizer, world) -> None:
    """Hugging Face directory of the trained model (gathered from ZeRO-3 partitions if needed)."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.ds.zero_optimization_stage() == 3):
        if world.is_main:
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            module.save_pretrained(str(directory), state_dict=state)
            tokenizer.save_pretrained(str(directory))


def summary(world, results: dict) -> None:
    lines = ["", "=" * 72]
    for name, m in results["metrics"].items():
        lines.append(f"{name}: accuracy {m['accuracy'] * 100:.2f}% on {m['examples']} examples"
                     + (f", F1 {m['f1'] * 100:.2f}" if "f1" in m else ""))
    if results["private"]:
        lines.append(f"privacy: epsilon={results['epsilon']:.3f} ({results['accountant'].upper()}; "
                     f"other accountant {results['epsilon_rdp']:.3f}), delta={results['delta']:.3g}, "
                     f"sigma={results['noise_multiplier']:.4f}, q={results['sample_rate']:.5f}, "
                     f"steps={results['steps']}, N={results['dataset_size']}, sampling={results['sampling']}")
    else:
        lines.append("privacy: NONE (privacy.enabled=false) - this model carries no DP guarantee")
    lines.append("=" * 72)
    log(world, "\n".join(lines))
