"""The phases of a compression run tree and the pipeline that chains them.

    RUN/ config.yaml  privacy_ledger.json  noise_seed.json  cache/
         teacher/  distill/  prune/   each: model/ checkpoints/ metrics.jsonl results.json
         eval/results.json            export/ (a Hugging Face directory with its model card)

teacher, distill and prune read the private data with DP-SGD and record their mechanisms in the
one ledger of the tree; eval and export are post-processing and spend nothing.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from pathlib import Path

import torch

from dist_dpc.compress.distill import DistillationLoss, every_other_layer, transformer_layers
from dist_dpc.compress.layer_files import choose_layers, layer_importance_on_disk, saved_depth
from dist_dpc.compress.pruning import (MaskEnforcer, apply_masks, compute_masks, depth_schedule,
                                       sparsity_schedule, sparsity_stats)
from dist_dpc.data import PAD_MULTIPLE
from dist_dpc.models import ModelConfig
from dist_dpc.engine.partitioned import full_numel
from dist_dpc.models.loading import check_max_length, set_trainable
from dist_dpc.pipeline.config import ALL_PHASES, MODEL_PHASES, Config
from dist_dpc.pipeline.dataset_pass import teacher_logits
from dist_dpc.pipeline.head_init import HeadStart
from dist_dpc.pipeline.lineage import import_lineage
from dist_dpc.pipeline.trainer import (PhaseContext, check_before_spending, evaluate_engine, finish_phase,
                                       frozen_for_phase, load_for_phase, local_device, open_phase, open_tracker,
                                       phase_privacy, phase_results, planned_steps, root_of, run_train, save_model,
                                       steps_per_epoch, train_dp, write_layers)
from dist_dpc.privacy.ledger import PrivacyLedger
from dist_dpc.tasks import TASKS, make_task
from dist_dpc.utils.logging import log



class PhaseOrderError(ValueError):
    """A phase needs the output of another phase that has not completed."""


# -- sources ---------------------------------------------------------------------------------------
def completed(cfg: Config, phase: str) -> bool:
    return (root_of(cfg) / phase / "results.json").is_file()


def source_model(cfg: Config, phase: str, reference: str) -> Path:
    """Model directory of the phase named by ``reference`` (auto: the last model-producing phase
    listed before ``phase``), or ``reference`` itself when it is a directory."""
    if reference not in ("auto", *MODEL_PHASES):
        path = Path(reference)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{phase}: source model {reference!r} is not a phase name "
                                    f"({', '.join(MODEL_PHASES)}) nor a model directory with config.json")
        return path
    if reference == "auto":
        listed = cfg.pipeline.phases
        before = listed[:listed.index(phase)] if phase in listed else listed
        candidates = [p for p in before if p in MODEL_PHASES and p != phase]
        if not candidates:
            raise PhaseOrderError(f"{phase}: no model-producing phase before it in pipeline.phases={listed}; "
                                  "name one explicitly (e.g. prune.source=teacher)")
        reference = candidates[-1]
    if not completed(cfg, reference):
        raise PhaseOrderError(f"{phase} needs the {reference} phase's model, but {root_of(cfg) / reference} holds no "
                              f"completed {reference} phase: run `dpc {reference}` first (or `dpc pipeline`)")
    return root_of(cfg) / reference / "model"


def load_model_dir(path: Path, ctx: PhaseContext, trainable: list[str] | None = None,
                   field: str = "model.trainable", *, what: str | None = None):
    """A saved model of an earlier phase (plain: adapters were merged on saving); ``trainable`` is the
    phase's choice of what trains (phase_trainable), ``field`` the setting it came from. ``what``
    (a model the phase trains or runs): built partitioned at ZeRO 3 (load_for_phase); without it
    whole (eval, export)."""
    cfg = ctx.cfg
    model_cfg = ModelConfig(name=str(path), task=cfg.model.task, tokenizer=cfg.model.tokenizer,
                            num_labels=cfg.model.num_labels, dropout=cfg.model.dropout,
                            freeze_embeddings=cfg.model.freeze_embeddings)

    def load():
        return ctx.task.load_model(model_cfg, ctx.tokenizer, num_labels=ctx.num_labels, label_names=None,
                                   seed=cfg.run.seed)

    model = load() if what is None else load_for_phase(ctx, load, what, name=str(path))
    set_trainable(model, trainable, field)
    return model


def phase_trainable(cfg: Config, section: str) -> tuple[list[str] | None, str]:
    """What a compression phase trains, and the setting that said so (for errors):
    {distill,prune}.trainable, else model.trainable. With model.lora the phase must say: the adapters
    belong to the teacher (merged into the model the phase starts from), and training every weight of
    it instead would be a silent change of recipe."""
    own = getattr(cfg, section).trainable
    if own is not None:
        return own, f"{section}.trainable"
    if cfg.model.lora is not None:
        raise ValueError(f"{section} with model.lora: the adapters train the teacher; this phase trains a plain model "
                         f"(adapters merged). Set {section}.trainable, e.g. {section}.trainable=[bias,LayerNorm,pooler,"
                         f"classifier] (DP-BiTFiT, the default) or {section}.trainable=['.*'] (every weight)")
    return cfg.model.trainable, "model.trainable"


# -- teacher ---------------------------------------------------------------------------------------
def run_teacher(cfg: Config) -> dict:
    """DP fine-tuning of the pre-trained model on the private task (model.name)."""
    return run_train(cfg, phase="teacher")


# -- distill (DPKD, Alg. 1) ------------------------------------------------------------------------
def run_distill(cfg: Config) -> dict:
    d = cfg.distill
    make_task(cfg.model, cfg.data).refuse_unsupported("distill")
    trainable, trainable_field = phase_trainable(cfg, "distill")
    teacher_dir = Path(d.teacher) if d.teacher else source_model(cfg, "distill", "teacher")
    ctx = open_phase(cfg, "distill")
    import_lineage(ctx, teacher_dir, role="distill.teacher")
    teacher = load_model_dir(teacher_dir, ctx, what="teacher")  # frozen by DistillationLoss
    teacher_config = teacher.config
    if d.student == "from_teacher":
        depth = saved_depth(teacher_dir)
        layer_map = d.layer_map if d.layer_map is not None else every_other_layer(depth)
        if not layer_map or len(set(layer_map)) != len(layer_map) or any(not 0 <= i < depth for i in layer_map):
            raise ValueError(f"distill.layer_map={layer_map} is invalid: distinct teacher layer indices in [0, {depth})")
        # Copying the DP teacher's layers is post-processing of a DP model: no privacy cost. They are
        # cut from its files (as structured pruning does) and the student is built from them, so at
        # ZeRO 3 it is partitioned from the start. What trains is chosen on the student's own
        # parameter names (its layers renumbered 0, 1, ...).
        write_layers(ctx, teacher_dir, ctx.directory / "student_init", layer_map,
                     record=ctx.directory / "student_layers.json")
        student = load_model_dir(ctx.directory / "student_init", ctx, trainable, trainable_field, what="student")
        init = f"teacher layers {layer_map}"
    else:
        layer_map = None
        import_lineage(ctx, d.student, role="distill.student")
        student = load_for_phase(ctx, lambda: ctx.task.load_model(
            ModelConfig(name=d.student, task=cfg.model.task, num_labels=cfg.model.num_labels, dropout=cfg.model.dropout,
                        trainable=trainable, freeze_embeddings=cfg.model.freeze_embeddings),
            ctx.tokenizer, num_labels=ctx.num_labels, label_names=ctx.label_names, seed=cfg.run.seed), "student",
            name=d.student)
        if student.config.vocab_size != teacher.config.vocab_size:
            raise ValueError(f"distill.student={d.student!r} has a vocabulary of {student.config.vocab_size}, the "
                             f"teacher {teacher.config.vocab_size}: distillation on the same batch needs one tokenizer")
        init = f"pre-trained {d.student}"
    # At ZeRO 3 the teacher is partitioned like the student (each rank 1/world of it, no optimizer state).
    whole = sum(full_numel(p) for p in teacher.parameters())
    teacher = frozen_for_phase(ctx, teacher)
    if hasattr(teacher, "ds_inference"):
        from dist_dpc.engine.frozen import local_numel

        log(ctx.world, f"[distill] teacher partitioned over {ctx.world.world_size} ranks (ZeRO 3): rank 0 holds "
                       f"{local_numel(teacher):,} of its {whole:,} parameters")
    loss = DistillationLoss(teacher, alpha=d.alpha, temperature=d.temperature, hidden_weight=d.hidden_weight,
                            layer_map=layer_map, token_level=ctx.task.token_level)
    steps = planned_steps(d.epochs or cfg.train.epochs, cfg.train.max_steps, steps_per_epoch(ctx))
    if loss.reads_teacher:  # the teacher reads the same batches: its positions must hold them too
        check_max_length(teacher_config, cfg.data.max_length, "the distill phase's teacher", pad_multiple=PAD_MULTIPLE)
    check_before_spending(ctx, student, steps=steps, lr=d.lr)
    start = HeadStart.plan(ctx, student)
    privacy = phase_privacy(ctx, steps + start.probe_steps, fixed=start.fixed)
    tracker = open_tracker(ctx)
    log(ctx.world, f"[distill] student: {init}; loss (1-{d.alpha})*CE + {d.alpha}*T^2*KL, T={d.temperature}"
                   + (f", hidden MSE x{d.hidden_weight}" if d.hidden_weight else ""))
    # One teacher pass over the data instead of a teacher forward in every step: a classifier's logits
    # are a small table (N x classes); a causal LM's (a vocabulary per token) are not, so its teacher
    # runs each step. The probe fits the student's classifier to the same loss (no hidden-state term).
    table = teacher_logits(ctx, teacher) if d.alpha and not ctx.task.token_level else None
    loss.use_teacher_logits(table)
    del teacher  # the loss keeps it where it still runs it; else its memory (or ZeRO-3 partitions) is freed
    info = start.run(ctx, student, ctx.directory, ctx.key, teacher_logits=table, alpha=d.alpha,
                     temperature=d.temperature)
    engine = train_dp(ctx, student, directory=ctx.directory, steps=steps, privacy=privacy, tracker=tracker,
                      loss_fn=loss, lr=d.lr)
    metrics = evaluate_engine(engine, ctx)
    results = phase_results(ctx, engine, metrics, steps, student_init=init, layer_map=layer_map, alpha=d.alpha,
                            temperature=d.temperature, source=str(teacher_dir),
                            **start.results(ctx, info))
    save_model(ctx, engine, ctx.directory / "model")
    finish_phase(ctx, tracker, results, ctx.directory / "model")
    return results


# -- prune (DPIMP, Alg. 2 and 3) -------------------------------------------------------------------
def run_prune(cfg: Config) -> dict:
    """Rounds of (prune by magnitude -> DP fine-tune), one DeepSpeed engine per round; the rounds
    share one sigma, calibrated for all their steps together, and one ledger entry."""
    p = cfg.prune
    make_task(cfg.model, cfg.data).refuse_unsupported("prune")
    if p.method != "structured" and cfg.train.bf16 and cfg.train.zero_stage == 0:
        raise ValueError(f"prune.method={p.method!r} in bf16 needs train.zero_stage >= 1 (at ZeRO 0 DeepSpeed's bf16 "
                         "optimizer keeps no per-parameter map to its fp32 copy, so the masks could not follow it): set "
                         "train.zero_stage=1 (or 2, 3), or train.bf16=false")
    trainable, trainable_field = phase_trainable(cfg, "prune")
    source = source_model(cfg, "prune", p.source)
    ctx = open_phase(cfg, "prune")
    import_lineage(ctx, source, role="prune.source")
    steps_per_round = planned_steps((p.epochs or cfg.train.epochs) / p.rounds, cfg.train.max_steps,
                                    steps_per_epoch(ctx))
    total_steps = steps_per_round * p.rounds
    # head_init runs in every round, on the pruned model: its steps and DP mean count once per round.
    if p.method == "structured":
        # Structured rounds rank and cut the layers of a saved model one tensor at a time and load only
        # the kept layers (compress/layer_files.py): the unpruned model is never built on any rank.
        start_depth = len(layer_importance_on_disk(source))
        target_layers = p.target_layers or math.ceil(start_depth / 2)
        depths = depth_schedule(start_depth, target_layers, p.rounds)
        first_keep = _cut_layers(ctx, source, ctx.directory / "round1" / "input", depths[0], p.keep_last_layer)
        model = load_model_dir(ctx.directory / "round1" / "input", ctx, trainable, trainable_field, what="model")
    else:
        model = load_model_dir(source, ctx, trainable, trainable_field, what="model")
    check_before_spending(ctx, model, steps=steps_per_round, lr=p.lr)
    start = HeadStart.plan(ctx, model)  # pruning keeps the head: the same settings every round
    privacy = phase_privacy(ctx, total_steps + start.probe_steps * p.rounds, fixed=start.fixed * p.rounds)
    tracker = open_tracker(ctx)
    if p.method != "structured":
        start_depth = len(transformer_layers(model)[0])
    sparsities = sparsity_schedule(p.target_sparsity, p.rounds)
    masks, kept_layers, engine = None, list(range(start_depth)), None
    for r in range(p.rounds):
        round_dir = ctx.directory / f"round{r + 1}"
        done = round_dir / "model"
        if (round_dir / "done.json").is_file() and r + 1 < p.rounds:
            # A resumed phase skips finished rounds: their model is the next round's input. (The
            # last round is replayed from its checkpoint: its engine is needed for evaluation.)
            model = load_model_dir(done, ctx, trainable, trainable_field, what="model")
            state = json.loads((round_dir / "done.json").read_text())
            kept_layers = state["kept_layers"]
            masks = _load_masks(round_dir) if p.method != "structured" else None
            continue
        # Pruning reads only DP weights: post-processing, no privacy cost.
        if p.method == "structured":
            if r == 0:
                keep = first_keep  # cut and loaded above
            else:
                del model
                gc.collect()
                keep = _cut_layers(ctx, ctx.directory / f"round{r}" / "model", round_dir / "input", depths[r],
                                   p.keep_last_layer)
                model = load_model_dir(round_dir / "input", ctx, trainable, trainable_field, what="model")
            kept_layers = [kept_layers[i] for i in keep]
            log(ctx.world, f"[prune] round {r + 1}/{p.rounds}: kept layers {kept_layers} of the source's {start_depth}")
        else:
            masks = compute_masks(model, p.method, sparsities[r], previous=masks)
            apply_masks(model, masks)
            if ctx.is_main:
                round_dir.mkdir(parents=True, exist_ok=True)
                torch.save(masks, round_dir / "masks.pt")
            log(ctx.world, f"[prune] round {r + 1}/{p.rounds}: {p.method} sparsity "
                           f"{sparsity_stats(model)['prunable_sparsity']:.3f} of the prunable weights")
        enforcer = MaskEnforcer(model, masks) if masks is not None else None

        def setup(engine, enforcer=enforcer):
            if enforcer is not None:
                enforcer.bind(engine)

        # head_init and the DP-SGD steps of each round are released into the ledger as they happen;
        # the next round composes with them (train_dp takes its prior from the phase's budget).
        info = start.run(ctx, model, round_dir, _round_key(ctx.key, r))
        engine = train_dp(ctx, model, directory=round_dir, steps=steps_per_round, privacy=privacy,
                          tracker=tracker, lr=p.lr, key=_round_key(ctx.key, r), step_offset=r * steps_per_round,
                          setup=setup, desc=f"prune {r + 1}/{p.rounds}")
        moved = torch.tensor([enforcer.violations() if enforcer is not None else 0], dtype=torch.int64,
                             device=engine.ds.device)
        torch.distributed.all_reduce(moved)  # every rank stops together (at ZeRO 3 each sees its partition)
        if int(moved.item()):
            raise RuntimeError(f"prune round {r + 1}: {int(moved.item())} pruned weights moved off zero")
        save_model(ctx, engine, done)
        if ctx.is_main:
            ctx.run.write_json(round_dir / "done.json", {"round": r + 1, "kept_layers": kept_layers,
                                                         "steps": steps_per_round})
        if r + 1 < p.rounds:
            # The next round starts from the saved weights: a fresh module without this engine's hooks.
            del engine
            gc.collect()
            model = load_model_dir(done, ctx, trainable, trainable_field, what="model")
            engine = None
    metrics = evaluate_engine(engine, ctx)
    stats = sparsity_stats(engine.module)  # the whole model's, one tensor gathered at a time at ZeRO 3
    results = phase_results(ctx, engine, metrics, total_steps, method=p.method, rounds=p.rounds,
                            kept_layers=kept_layers if p.method == "structured" else None,
                            prunable_sparsity=stats["prunable_sparsity"],
                            nonzero_parameters=stats["nonzero_parameters"], source=str(source),
                            global_steps=total_steps, **start.results(ctx, info))
    # engine.accountant covers only the last round (plus everything before it as prior): epsilon
    # and steps above are for the whole phase because the prior includes the earlier rounds.
    save_model(ctx, engine, ctx.directory / "model")
    finish_phase(ctx, tracker, results, ctx.directory / "model")
    return results


def _cut_layers(ctx: PhaseContext, source: Path, target: Path, depth: int, keep_last: bool) -> list[int]:
    """Rank ``source``'s layers from its files, write the ``depth`` kept ones to ``target`` and return
    their indices. Every rank ranks the same bytes, so all agree."""
    keep = choose_layers(layer_importance_on_disk(source), depth, keep_last)
    write_layers(ctx, source, target, keep, record=target.parent / "kept_layers.json")
    return keep


def _round_key(key, r: int):
    """Rounds draw independent noise and batches (and head_init releases): one derived key each."""
    return key.derive("prune-round", r)


def _load_masks(round_dir: Path):
    path = round_dir / "masks.pt"
    return torch.load(path) if path.is_file() else None


# -- eval ------------------------------------------------------------------------------------------
def run_eval(cfg: Config) -> dict:
    """Every model of the run tree on the dev split(s): accuracy/F1, parameters, non-zeros, size on
    disk, inference throughput (and the 2:4 sparse-kernel speed-up on a GPU). Spends nothing."""
    ctx = open_phase(cfg, "eval", load_data=False)
    rows = []
    for phase in MODEL_PHASES:
        model_dir = ctx.run.path / phase / "model"
        results_file = ctx.run.path / phase / "results.json"
        if not results_file.is_file():
            continue
        trained = json.loads(results_file.read_text())
        model = load_model_dir(model_dir, ctx).to(local_device())
        metrics = {name: ctx.task.evaluate(model, data, ctx.tokenizer.pad_token_id, cfg.train.eval_batch_size)
                   for name, data in ctx.eval_sets.items()}
        first = next(iter(ctx.eval_sets.values()))
        row = {"phase": phase, "task": ctx.task.name, "metrics": metrics, **_size(model, model_dir),
               "examples_per_s": _throughput(ctx, model, first, cfg.train.eval_batch_size),
               "epsilon": trained.get("epsilon"), "private": trained.get("private"),
               "method": trained.get("method"), "layers": len(transformer_layers(model)[0])}
        if trained.get("method") == "2:4":
            row["sparse_2_4_speedup"] = _semi_structured_speedup(ctx, model, first)
        rows.append(row)
        del model
        gc.collect()
    if not rows:
        raise PhaseOrderError(f"eval: {ctx.run.path} holds no completed model phase ({', '.join(MODEL_PHASES)})")
    results = {"models": rows, "ledger": ctx.ledger.to_dict() if ctx.ledger is not None else None}
    if ctx.is_main:
        ctx.directory.mkdir(parents=True, exist_ok=True)
        ctx.run.write_json(ctx.directory / "results.json", results)
        log(ctx.world, accuracy_table(rows))
    torch.distributed.barrier()
    return results


def _size(model: torch.nn.Module, model_dir: Path) -> dict:
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    files = list(model_dir.glob("*.safetensors")) + list(model_dir.glob("*.bin"))
    return {"parameters": params, "nonzero_parameters": nonzero,
            "size_mb": sum(f.stat().st_size for f in files) / 2**20}


@torch.no_grad()
def _throughput(ctx: PhaseContext, model, data, batch_size: int, max_examples: int = 512) -> float:
    """Examples per second of the forward pass (the task's own batches, at most max_examples)."""
    model.eval()
    n = min(len(data), max_examples)
    device = next(model.parameters()).device
    pad_id = ctx.tokenizer.pad_token_id
    batches = [ctx.task.collate([data[j] for j in range(i, min(i + batch_size, n))], pad_id)
               for i in range(0, n, batch_size)]
    start = time.perf_counter()
    for batch in batches:
        model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


@torch.no_grad()
def _semi_structured_speedup(ctx: PhaseContext, model, data) -> float | None:
    """Dense vs torch's 2:4 sparse kernels on the pruned Linear layers (CUDA, fp16); None elsewhere."""
    if not torch.cuda.is_available():
        return None
    import copy

    from torch.sparse import to_sparse_semi_structured

    from dist_dpc.compress.pruning import prunable_weights

    dense = copy.deepcopy(model).half().cuda().eval()
    sparse = copy.deepcopy(dense)
    modules = dict(sparse.named_modules())
    for name in prunable_weights(sparse):
        module = modules[name.rsplit(".", 1)[0]]
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(to_sparse_semi_structured(module.weight))
    dense_rate = _throughput(ctx, dense, data, 64)
    sparse_rate = _throughput(ctx, sparse, data, 64)
    return sparse_rate / dense_rate


def accuracy_table(rows: list[dict]) -> str:
    """The eval phase's table: one row per model, the task's metric (accuracy, or perplexity)."""
    metric = TASKS[rows[0].get("task", "sequence_classification")].primary_metric if rows else "accuracy"
    lines = ["", f"{'model':<17} {'layers':>6} {'params':>11} {'non-zero':>11} {'MB':>7} {'ex/s':>8} "
                 f"{metric:>10} {'epsilon':>8}"]
    for row in rows:
        value = next(iter(row["metrics"].values()))[metric]
        shown = f"{value * 100:>9.2f}%" if metric == "accuracy" else f"{value:>10.3f}"
        eps = f"{row['epsilon']:.3f}" if row.get("epsilon") is not None else "inf"
        lines.append(f"{row['phase']:<17} {row['layers']:>6} {row['parameters']:>11,} {row['nonzero_parameters']:>11,} "
                     f"{row['size_mb']:>7.1f} {row['examples_per_s']:>8.1f} {shown} {eps:>8}")
    return "\n".join(lines)


# -- export ----------------------------------------------------------------------------------------
def run_export(cfg: Config) -> dict:
    """A Hugging Face directory (the task's Auto class .from_pretrained: AutoModelForSequenceClassification
    or AutoModelForCausalLM) with a model card stating epsilon, delta, the mechanisms and the phases;
    reloaded and checked before it is kept."""
    import transformers

    reference = cfg.pipeline.export_source
    if reference == "auto":
        produced = [p for p in cfg.pipeline.phases if p in MODEL_PHASES and completed(cfg, p)]
        if not produced:
            raise PhaseOrderError(f"export: no completed model phase in {root_of(cfg)}")
        reference = produced[-1]
    source = source_model(cfg, "export", reference)
    ctx = open_phase(cfg, "export", load_data=False)
    trained = json.loads((source.parent / "results.json").read_text())
    target = ctx.directory / "model"
    if ctx.is_main:
        tmp = ctx.directory / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        (tmp / "README.md").write_text(model_card(cfg, ctx, reference, trained))
        # Reload exactly as a user would and compare predictions with the source before publishing.
        auto = getattr(transformers, ctx.task.model_class)
        reloaded = auto.from_pretrained(str(tmp)).eval()
        original = load_model_dir(source, ctx).eval()
        data = next(iter(ctx.eval_sets.values()))
        a = ctx.task.predictions(reloaded, data, ctx.tokenizer.pad_token_id)
        b = ctx.task.predictions(original, data, ctx.tokenizer.pad_token_id)
        if not torch.equal(a, b):
            raise RuntimeError("export: the reloaded model predicts differently from the trained one")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        results = {"source_phase": reference, "directory": str(target), "epsilon": _ledger_total(ctx),
                   "delta": ctx.ledger.delta if ctx.ledger is not None else None, "checked_examples": int(a.shape[0]),
                   "model_class": ctx.task.model_class}
        ctx.run.write_json(ctx.directory / "results.json", results)
        tracker = open_tracker(ctx)
        tracker.summary({"final_epsilon": results["epsilon"], "delta": results["delta"], "source_phase": reference})
        tracker.artifact(target, name=f"{cfg.run.name}-export", kind="model",
                         metadata={"epsilon": results["epsilon"], "delta": results["delta"], "source_phase": reference,
                                   "accountant": cfg.privacy.accountant, "sampling": ctx.sampling,
                                   "private": ctx.ledger is not None})
        tracker.finish()
        log(ctx.world, f"[export] {target}: from the {reference} phase; {ctx.task.model_class}"
                       f".from_pretrained({str(target)!r}) reloads it (checked on {a.shape[0]} examples)")
    torch.distributed.barrier()
    return json.loads((ctx.directory / "results.json").read_text())


def _ledger_total(ctx: PhaseContext) -> float | None:
    return ctx.ledger.total_epsilon() if ctx.ledger is not None else None


def model_card(cfg: Config, ctx: PhaseContext, source_phase: str, trained: dict) -> str:
    ledger = ctx.ledger.to_dict() if ctx.ledger is not None else None
    lines = [f"# {cfg.run.name}: {source_phase} model", "",
             f"{'Causal language model' if ctx.task.name == 'causal_lm' else 'Sequence classifier'} trained with "
             f"dist-dpc (DP-SGD under DeepSpeed); load it with transformers.{ctx.task.model_class}.from_pretrained.", "",
             "## Privacy", ""]
    if ledger is None:
        lines += ["**No differential privacy**: trained with privacy.enabled=false; this model may reveal its "
                  "training data.", ""]
    else:
        lines += [f"- Guarantee: ({ledger['total_epsilon_prv']:.3f}, {ledger['delta']:.3g})-differential privacy "
                  f"with respect to adding or removing one of the N={ledger['dataset_size']} training examples, "
                  "for everything released from this run tree (all phases composed).",
                  f"- Accountant: PRV (opacus), heterogeneous composition of all phases; RDP bound "
                  f"{ledger['total_epsilon_rdp']:.3f} for comparison.",
                  f"- Target epsilon: {ledger['target_epsilon']}.",
                  f"- Mechanism: per-sample gradient clipping to {cfg.privacy.max_grad_norm} "
                  f"({cfg.privacy.clipping}), Gaussian noise, {ctx.sampling} sampling"
                  + ("" if ctx.sampling == "poisson" else " (the accounting assumes Poisson sampling: NOT a proven "
                                                          "bound for these fixed-size batches)") + "."
                  + (" The histogram phase: Gaussian noise on every control-code count (sensitivity 1, q = 1)."
                     if "histogram" in ledger["phases"] else ""), "",
                  "| phase | status | noise multiplier | sample rate | steps |", "|---|---|---|---|---|"]
        for name, entry in ledger["phases"].items():
            for m in entry["mechanisms"]:
                if m.get("kind") == "rdp_curve":  # `dpc tune`'s private selection (composed by RDP)
                    lines.append(f"| {name} | {entry['status']} | {m['label']} (RDP curve) | | |")
                    continue
                lines.append(f"| {name} | {entry['status']} | {m['noise_multiplier']:.4f} | {m['sample_rate']:.5f} "
                             f"| {m['steps']} |")
        lines.append("")
    lines += _released_without_dp(ctx, cfg)
    lines += _insecure_randomness(ctx, cfg)
    lines += ["## Phases", ""]
    for phase in cfg.pipeline.phases:
        f = ctx.run.path / phase / "results.json"
        if f.is_file() and phase in MODEL_PHASES:
            r = json.loads(f.read_text())
            shown = ctx.task.describe(next(iter(r["metrics"].values()))) if r.get("metrics") else "not evaluated"
            steps = (f"{r.get('steps')} steps on DP synthetic text, no DP-SGD" if r.get("noise_multiplier") is None
                     and r.get("private") else f"{r.get('steps')} DP-SGD steps")
            lines.append(f"- {phase}: {steps}, evaluation split: {shown}"
                         + (f", {r['method']} pruning" if r.get("method") else "")
                         + (f", student {r['student_init']}" if r.get("student_init") else ""))
    lines += ["", f"Exported from the {source_phase} phase ({trained.get('parameters', 0):,} parameters).",
              f"Data: {cfg.data.task}. Base model: {cfg.model.name}."
              + (f" Labels: {', '.join(ctx.label_names)} (the task's label schema)." if ctx.label_names else ""), ""]
    return "\n".join(lines)


def _released_without_dp(ctx: PhaseContext, cfg: Config) -> list[str]:
    """The card's warning when a phase of the tree ran with privacy.release_exact_statistics: its
    logs and results hold exact training statistics that the guarantee above does not cover."""
    marked = [phase for phase in cfg.pipeline.phases if phase in MODEL_PHASES
              and json.loads(_read_or(ctx.run.path / phase / "results.json")).get("statistics_released_without_dp")]
    if not marked:
        return []
    return [f"**WARNING: statistics released without DP.** Phase(s) {', '.join(marked)} ran with "
            "privacy.release_exact_statistics=true: their logs, metrics and results hold exact statistics of the "
            "training data (train loss, clipped fractions, gradient norms, batch sizes), which the guarantee above "
            "does not cover.", ""]


def _insecure_randomness(ctx: PhaseContext, cfg: Config) -> list[str]:
    """The card's warning when a phase drew its noise from a seed (privacy.randomness=
    insecure_reproducible): whoever knows or guesses the seed can subtract the noise."""
    marked = [phase for phase in cfg.pipeline.phases if phase in (*MODEL_PHASES, "histogram")
              and json.loads(_read_or(ctx.run.path / phase / "results.json")).get("randomness") == "insecure_reproducible"]
    if not marked:
        return []
    return [f"**WARNING: noise drawn from a seed.** Phase(s) {', '.join(marked)} ran with "
            "privacy.randomness=insecure_reproducible: their noise is derived from privacy.noise_seed or the run "
            "tree's noise_seed.json. Anyone who knows or guesses that seed can regenerate and subtract the noise; the "
            "guarantee above holds only while the seed stays secret and unguessable.", ""]


def _read_or(path: Path, default: str = "{}") -> str:
    return path.read_text() if path.is_file() else default


# -- the chain -------------------------------------------------------------------------------------
def run_generate(cfg: Config) -> dict:
    from dist_dpc.pipeline.generate import run_generate as generate

    return generate(cfg)


def run_histogram(cfg: Config) -> dict:
    from dist_dpc.pipeline.histogram_phase import run_histogram as histogram

    return histogram(cfg)


def run_distill_synthetic(cfg: Config) -> dict:
    from dist_dpc.pipeline.distill_synthetic import run_distill_synthetic as distill_synthetic

    return distill_synthetic(cfg)


RUNNERS = {"teacher": run_teacher, "distill": run_distill, "prune": run_prune, "eval": run_eval,
           "export": run_export, "generate": run_generate, "histogram": run_histogram,
           "distill_synthetic": run_distill_synthetic}
COMPLETED_BY_RESULTS = (*MODEL_PHASES, "histogram")  # a rerun of the pipeline skips them once results.json exists


def run_phase(cfg: Config, phase: str) -> dict:
    from dist_dpc.pipeline.tune import apply_selection, run_tune

    if phase == "tune":
        return run_tune(cfg)
    if phase in ("train", *MODEL_PHASES):
        cfg = apply_selection(cfg, phase)  # a completed `dpc tune` of this tree chose some values
    if phase == "train":
        return run_train(cfg)
    if phase not in RUNNERS:
        raise ValueError(f"unknown phase {phase!r}: allowed {', '.join(ALL_PHASES)}")
    return RUNNERS[phase](cfg)


def check_phases(cfg: Config, phases) -> None:
    """Settings a listed phase would refuse, checked before the first phase trains (or is submitted):
    with the config as given, every `dpc tune` candidate (tune.search may set model.lora) and a
    selection a completed tune made. Phases already completed are not run again and not checked."""
    from dist_dpc.pipeline.tune import SELECTION_FILE, with_values

    variants = [cfg]
    if "tune" in phases and cfg.tune.search:
        variants += [with_values(cfg, values) for values in cfg.tune.candidates()]
    selection = root_of(cfg) / "tune" / SELECTION_FILE
    if selection.is_file():
        variants.append(with_values(cfg, json.loads(selection.read_text())["selected"]))
    task = make_task(cfg.model, cfg.data)
    for phase in phases:
        task.refuse_unsupported(phase)  # before the first phase spends anything
    if "tune" in phases and cfg.tune.search:
        from dist_dpc.pipeline.tune import _check_candidates

        _check_candidates(cfg, cfg.tune.candidates())
    for phase in ("distill", "prune"):
        if phase in phases and not completed(cfg, phase):
            for variant in variants:
                phase_trainable(variant, phase)
    if "histogram" in phases and not completed(cfg, "histogram"):
        from dist_dpc.pipeline.histogram_phase import check_histogram

        check_histogram(cfg, phases)
    if "distill_synthetic" in phases and not completed(cfg, "distill_synthetic"):
        from dist_dpc.pipeline.distill_synthetic import check_student

        check_student(cfg)


def run_pipeline(cfg: Config) -> dict:
    """pipeline.phases in order; completed phases are skipped, so re-running resumes."""
    check_phases(cfg, cfg.pipeline.phases)
    out = {}
    for phase in cfg.pipeline.phases:
        if phase in COMPLETED_BY_RESULTS and completed(cfg, phase):
            print(f"[pipeline] {phase}: already completed in {root_of(cfg) / phase}, skipped", flush=True)
            out[phase] = json.loads((root_of(cfg) / phase / "results.json").read_text())
            continue
        out[phase] = run_phase(cfg, phase)  # eval and export are redone: cheap, and they describe the current models
        gc.collect()
    ledger_file = root_of(cfg) / "privacy_ledger.json"
    if ledger_file.is_file() and torch.distributed.get_rank() == 0:
        data = json.loads(ledger_file.read_text())
        theirs = PrivacyLedger(ledger_file, data.get("target_epsilon"), data["delta"], data["dataset_size"],
                               data["accountant"])
        print(ledger_summary(theirs), flush=True)
    eval_file = root_of(cfg) / "eval" / "results.json"
    if "eval" in cfg.pipeline.phases and eval_file.is_file() and torch.distributed.get_rank() == 0:
        print(accuracy_table(json.loads(eval_file.read_text())["models"]), flush=True)
    return out


def ledger_summary(ledger: PrivacyLedger) -> str:
    d = ledger.to_dict()
    lines = ["", "privacy ledger " + str(ledger.path), f"{'phase':<24} {'status':<10} {'sigma':>8} {'q':>9} {'steps':>7}"]
    for name, entry in d["phases"].items():
        for m in entry["mechanisms"]:
            if m.get("kind") == "rdp_curve":
                lines.append(f"{name:<24} {entry['status']:<10} {m['label'] + ' (RDP curve)':>34}")
                continue
            lines.append(f"{name:<24} {entry['status']:<10} {m['noise_multiplier']:>8.4f} {m['sample_rate']:>9.5f} "
                         f"{m['steps']:>7}")
    curves = any(m.get("kind") == "rdp_curve" for e in d["phases"].values() for m in e["mechanisms"])
    how = "RDP composition of all phases: the ledger holds an RDP curve" if curves else "PRV composition of all phases"
    lines.append(f"total: epsilon={d['total_epsilon_prv']:.3f} ({how}; RDP "
                 f"{d['total_epsilon_rdp']:.3f}), delta={d['delta']:.3g}, N={d['dataset_size']}, target "
                 f"{d['target_epsilon']}")
    return "\n".join(lines)
