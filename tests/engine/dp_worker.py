"""Worker started by torchrun from the engine tests: runs DP steps and saves what rank 0 sees.

Usage: torchrun --nproc_per_node W tests/engine/dp_worker.py SPEC.json OUT.pt
SPEC: {"cases": [{"model" (a debug model name) or "random_model" (a tests/engine/random_models spec),
       "stage", "clipping", "accumulation", "noise_multiplier", "max_grad_norm", "micro_batch_size", "lr",
       "steps"}...], "batch_size": G, "seed": s, "mode": "update"|"noise"}
"""

from __future__ import annotations

import json
import sys

import torch


def logical_batch(vocab: int, size: int, length: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (size, length), generator=gen)
    mask = torch.ones(size, length, dtype=torch.long)
    for i in range(0, size if length > 2 else 0, 3):  # some right-padded rows
        cut = 2 + i % (length - 2)
        ids[i, cut:] = 0
        mask[i, cut:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (size,), generator=gen)}


def lm_batch(vocab: int, size: int, length: int, seed: int) -> dict:
    """A causal-LM batch: random ids, right padding on some rows, and labels that are -100 on a
    control-code prefix of 0-3 tokens and on the padding (what dist_dpc.data.lm.collate_lm builds)."""
    batch = logical_batch(vocab, size, length, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = batch["input_ids"].clone()
    prefix = torch.randint(0, 4, (size,), generator=gen)
    for i in range(size):
        labels[i, :int(prefix[i])] = -100
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return batch


def rank_micro_batches(batch: dict, rank: int, world: int, micro: int, accumulation: int) -> list[dict]:
    """Round-robin share of the logical batch, cut into ``accumulation`` fixed-size micro-batches
    whose spare rows are padding (sample_mask 0)."""
    size = batch["labels"].shape[0]
    mine = list(range(rank, size, world))
    out = []
    for j in range(accumulation):
        idx = mine[j * micro:(j + 1) * micro]
        rows = {k: v[idx] for k, v in batch.items()}
        pad = micro - len(idx)
        length = batch["input_ids"].shape[1]
        rows = {
            "input_ids": torch.cat([rows["input_ids"], torch.zeros(pad, length, dtype=torch.long)]),
            "attention_mask": torch.cat([rows["attention_mask"], torch.nn.functional.one_hot(torch.zeros(pad, dtype=torch.long), length)]),
            "labels": torch.cat([rows["labels"], torch.full((pad, *rows["labels"].shape[1:]),
                                                              -100 if rows["labels"].dim() == 2 else 0, dtype=torch.long)]),
            "sample_mask": torch.cat([torch.ones(len(idx)), torch.zeros(pad)]),
            # Each row's place in the logical batch, as the trainer's micro_batch gives its dataset row.
            "example_index": torch.tensor(idx + [0] * pad, dtype=torch.long),
        }
        out.append(rows)
    return out


def full_params(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=engine.ds.zero_optimization_stage() == 3):
        return {n: p.detach().clone().double() for n, p in params}


def case_model(case: dict, spec: dict):
    """(model, per-sample loss) of a case: a debug model by name, or a random model from its spec."""
    if "random_model" in case:
        from tests.engine.random_models import RandomStack, random_model_loss

        return RandomStack(case["random_model"]), random_model_loss
    if case.get("task") == "causal_lm":
        return causal_lm_case(case, spec["seed"])
    from dist_dpc.engine.losses import sequence_classification_loss
    from dist_dpc.models import ModelConfig, load_sequence_classifier

    model = load_sequence_classifier(ModelConfig(name=case["model"], dropout=0.0), num_labels=2, seed=spec["seed"])
    if case.get("lora"):
        model = with_test_lora(case["model"], spec["seed"], case["lora"])
    if case.get("distill"):
        return model, distill_loss(case, spec["seed"])
    return model, sequence_classification_loss


def distill_loss(case: dict, seed: int):
    """DPKD's loss against a teacher of the same shape (seed + 1), with the hidden-state term; the
    teacher partitioned over the ranks (ZeRO-3 inference) when case["distill"]["sharded"]."""
    from dist_dpc.compress.distill import DistillationLoss
    from dist_dpc.models import ModelConfig, load_sequence_classifier

    d = case["distill"]
    teacher = load_sequence_classifier(ModelConfig(name=case["model"], dropout=0.0), num_labels=2, seed=seed + 1)
    if d.get("sharded"):
        from dist_dpc.engine.frozen import partition_frozen

        teacher = partition_frozen(teacher, micro_batch_size=case["micro_batch_size"], bf16=False)
    return DistillationLoss(teacher, alpha=d["alpha"], temperature=d["temperature"], hidden_weight=d["hidden_weight"],
                            layer_map=d["layer_map"])


@torch.no_grad()
def one_at_a_time(teacher, batch: dict) -> torch.Tensor:
    """The teacher's logits of each row of the logical batch, run alone on its real tokens: the
    table DistillationLoss reads by example_index. Every rank runs every row (a partitioned
    teacher's forward is a collective)."""
    rows = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        n = int(mask.sum())
        rows.append(teacher(input_ids=ids[None, :n], attention_mask=mask[None, :n]).logits.float())
    return torch.cat(rows)


def with_test_lora(name: str, seed: int, rank: int):
    """A debug model with DP-LoRA adapters whose B matrices are random (peft starts them at zero,
    which would make every A gradient zero and the test blind to them)."""
    import torch

    from dist_dpc.models import ModelConfig, load_sequence_classifier
    from dist_dpc.models.config import LoraSettings

    model = load_sequence_classifier(ModelConfig(name=name, dropout=0.0, lora=LoraSettings(r=rank)), num_labels=2,
                                     seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model


def causal_lm_case(case: dict, seed: int):
    """A debug causal LM (vocabulary of the byte-level tokenizer: 257) and the LM loss; with "lora",
    adapters whose B matrices are random (as with_test_lora)."""
    from dist_dpc.engine.losses import causal_lm_loss
    from dist_dpc.models import ModelConfig, load_causal_lm
    from dist_dpc.models.config import LoraSettings

    lora = LoraSettings(r=case["lora"], target_modules=case.get("lora_targets")) if case.get("lora") else None
    model = load_causal_lm(ModelConfig(name=case["model"], task="causal_lm", dropout=0.0, lora=lora), None, seed=seed)
    if lora is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model, causal_lm_loss


def case_batch(case: dict, spec: dict, model) -> dict:
    if case.get("task") == "causal_lm":
        return lm_batch(model.config.vocab_size, case.get("batch_size", spec.get("batch_size")), spec.get("length", 9),
                        spec["seed"])
    random_model = case.get("random_model")
    vocab = random_model["vocab"] if random_model else model.config.vocab_size
    length = random_model["length"] if random_model else spec.get("length", 9)
    return logical_batch(vocab, case.get("batch_size", spec.get("batch_size")), length, spec["seed"])


def make_engine(case: dict, spec: dict, world):
    from dist_dpc.engine import DPEngine, build_ds_config
    from dist_dpc.engine.lr_schedule import make_lr_schedule
    from dist_dpc.privacy import PrivacyConfig
    from dist_dpc.privacy.randomness import SecretKey

    model, loss_fn = case_model(case, spec)
    if spec.get("float64"):
        model = model.double()
    initial = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    user_ds = {"zero_optimization": {"stage": case["stage"], "stage3_param_persistence_threshold": 0},
               "optimizer": {"type": "SGD", "params": {"lr": case["lr"]}}}
    if case.get("optimizer") == "adamw":
        user_ds["optimizer"] = {"type": "AdamW", "params": {"lr": case["lr"], "torch_adam": True}}
    if case.get("comms"):
        user_ds["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    ds_config = build_ds_config(
        user_ds,
        micro_batch_size=case["micro_batch_size"], world_size=world.world_size, zero_stage=case["stage"],
        lr=case["lr"], weight_decay=0.0, optimizer="sgd", bf16=False)
    privacy = PrivacyConfig(enabled=case.get("private", True), target_epsilon=None,
                            noise_multiplier=case["noise_multiplier"], delta=1e-6,
                            max_grad_norm=case["max_grad_norm"], clipping=case["clipping"])
    engine = DPEngine(model, ds_config, privacy, dataset_size=10_000, expected_batch_size=spec["expected_batch_size"],
                      planned_steps=case.get("steps", 1), loss_fn=loss_fn, world=world,
                      # A seed-derived (insecure, reproducible) key: the resume test needs the same noise.
                      key=SecretKey.from_seed(spec["seed"]),
                      lr_schedule=make_lr_schedule(case.get("lr_schedule", "constant"), case.get("steps", 1),
                                                   case.get("warmup_steps", 0)))
    return engine, initial


def run_case(case: dict, spec: dict, world) -> dict:
    engine, initial = make_engine(case, spec, world)
    size = case.get("batch_size", spec.get("batch_size"))
    batch = case_batch(case, spec, engine.module)
    if case.get("distill", {}).get("table"):
        engine.loss_fn.use_teacher_logits(one_at_a_time(engine.loss_fn.teacher, batch))
    comms = {}
    for step in range(case.get("steps", 1)):
        if step == case.get("resume_at"):
            # Simulated preemption: checkpoint, throw the engine away, rebuild from scratch, load.
            directory = spec["checkpoint_dir"]
            engine.save_checkpoint(directory, tag=f"step{step}")
            del engine
            engine, _ = make_engine(case, spec, world)
            engine.load_checkpoint(directory, tag=f"step{step}")
        micro = rank_micro_batches(batch, world.rank, world.world_size, case["micro_batch_size"], case["accumulation"])
        if case.get("comms"):
            from deepspeed.comm.comm import comms_logger

            comms_logger.comms_dict = {}  # count the collectives of the last step only (the first warms up)
        engine.train_step(micro, logical_batch_size=size)
        if case.get("comms"):
            comms = {name: sorted((int(size), v[0]) for size, v in sizes.items()) for name, sizes in comms_logger.comms_dict.items()}
    final = full_params(engine)
    teacher = getattr(engine.loss_fn, "teacher", None)
    if teacher is not None:
        from dist_dpc.engine.frozen import local_numel

        comms["teacher_local_numel"] = local_numel(teacher)
    return {"initial": initial, "final": final, "noise_stream": engine.noise_stream, "comms": comms,
            "epsilon": engine.epsilon(), "accountant": engine.accountant.state_dict()}


def main() -> None:
    from dist_dpc.engine import init_distributed

    spec = json.loads(open(sys.argv[1]).read())
    world = init_distributed()
    results = [run_case(case, spec, world) for case in spec["cases"]]
    gathered = [None] * world.world_size
    torch.distributed.all_gather_object(gathered, [{"final": r["final"], "noise_stream": r["noise_stream"]} for r in results])
    if world.rank == 0:
        torch.save({"results": results, "per_rank": gathered}, sys.argv[2])
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
