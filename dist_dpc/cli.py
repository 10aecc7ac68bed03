"""``dpc``: the command line. Thin: parse, build the config, call the phase, report errors plainly."""

from __future__ import annotations

import argparse
import os
import sys
import time

from dist_dpc.utils.config_loader import ConfigError, describe_fields

EPILOG_HEAD = """config keys (set in the YAML file or override as section.key=value):"""


CONFIG_KEYS = "\0every config key"  # a command's epilog: replaced by the key list only when help is printed


class _Parser(argparse.ArgumentParser):
    """Lists the config keys only when help is printed: describing them reads every config class's
    source (about 7 s), which a run that only parses its arguments must not pay."""

    def format_help(self) -> str:
        if self.epilog == CONFIG_KEYS:
            self.epilog = _config_help()
        return super().format_help()


def _config_help() -> str:
    from dist_dpc.pipeline.config import Config

    rows = describe_fields(Config)
    width = max(len(r[0]) for r in rows)
    lines = [EPILOG_HEAD]
    for name, kind, default, doc in rows:
        lines.append(f"  {name:<{width}}  {kind} (default: {default!r})")
        if doc:
            lines.append(f"  {'':<{width}}    {doc}")
    return "\n".join(lines)


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    if config_required:
        p.add_argument("config", help="YAML run config (see configs/); its keys are listed below")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. train.lr=1e-4 privacy.target_epsilon=3")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="dpc", formatter_class=fmt,
        description="dist-dpc: fine-tune and compress language models with differential privacy under DeepSpeed.",
        epilog="Run `dpc COMMAND --help` for a command's options and every config key.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", formatter_class=fmt, epilog=CONFIG_KEYS,
                       help="DP fine-tuning of a sequence classifier or causal LM (single process, or under torchrun / deepspeed / srun)",
                       description="DP-SGD fine-tuning of a sequence classifier or causal LM (model.task) with DeepSpeed; prints dev accuracy or perplexity "
                                   "and the privacy spent (epsilon, delta, sigma, q). For several processes launch "
                                   "`torchrun --nproc_per_node N -m dist_dpc.train CONFIG ...` or "
                                   "`deepspeed --module dist_dpc.train CONFIG ...`.")
    _add_config_args(p)

    phase_help = {
        "tune": ("hyper-parameter selection that is itself accounted (section tune)",
                 "private: Papernot & Steinke's random number of DP trials scored on a private holdout, only the "
                 "best released, its cost in the ledger; public_proxy: trials on a named public data set, no cost. "
                 "Writes RUN/tune (selected values, model); later phases of the tree apply the selected values."),
        "teacher": ("DP fine-tuning of the pre-trained model (model.name) on the private task",
                    "Writes RUN/teacher; its sigma is calibrated so that the run tree stays within its share of "
                    "privacy.target_epsilon (pipeline.budget_split)."),
        "distill": ("DPKD: a smaller student trained with DP-SGD against the DP teacher (section distill)",
                    "Student = every other teacher layer, the last one kept (distill.layer_map), or distill.student; loss "
                    "(1-alpha)*CE + alpha*T^2*KL(teacher||student); the teacher's logits come from the same private batch."),
        "prune": ("DPIMP: rounds of magnitude pruning and DP fine-tuning (section prune)",
                  "prune.method = unstructured (global magnitude, target_sparsity), structured (whole layers, "
                  "target_layers) or 2:4; pruned weights stay exactly zero."),
        "eval": ("accuracy/F1, parameters, non-zeros, size and throughput of every model of the run tree",
                 "Post-processing: spends no privacy. Writes RUN/eval/results.json and prints the table."),
        "export": ("a Hugging Face directory with a model card stating epsilon, delta and the phases",
                   "Post-processing: spends no privacy. Writes RUN/export/model, reloadable with "
                   "AutoModelForSequenceClassification.from_pretrained, checked against the trained model."),
        "generate": ("sample text from a trained causal LM (section generate), sharded and resumable",
                     "Post-processing: spends no privacy. Prompts are control codes with counts (generate.prompts "
                     "or generate.prompts_file); top-k/top-p/temperature/no-repeat n-gram sampling; batch b belongs "
                     "to shard (b mod generate.shards) (a SLURM array task under `dpc submit`) and is written atomically, "
                     "so a rerun finishes only what is missing. Writes RUN/generate/samples.jsonl "
                     "(datasets.load_dataset('json', data_files=...))."),
        "histogram": ("a DP histogram of the private data's control codes: generate's prompt allocation (section histogram)",
                      "Gaussian noise on every category's count of the public schema (histogram.code_values), "
                      "recorded in the ledger; clamped at 0 and rounded into histogram.samples prompts (default N). "
                      "Writes RUN/histogram/allocation.jsonl, which generate uses when it is given no prompts."),
        "distill_synthetic": ("a smaller causal LM trained on the DP teacher's synthetic text with KD (section distill_synthetic)",
                              "Flemings & Annavaram 2024: no DP-SGD and no privacy spent (its inputs are DP outputs; "
                              "private data is refused). Loss (1-lambda)*CE + lambda*T^2*KL per text token (+ beta*MSE "
                              "of last hidden states, projected when widths differ); 1 % of the synthetic set held out "
                              "for early stopping. Writes RUN/distill_synthetic/model."),
        "pipeline": ("all of pipeline.phases in order (teacher -> distill -> prune -> eval -> export by default)",
                     "Completed training phases are skipped, so re-running resumes. Prints the privacy ledger "
                     "and the accuracy table at the end."),
    }
    phase_help["audit"] = (
        "empirical lower bound on epsilon from one extra run with canaries (section audit)",
        "Steinke, Nasr & Jagielski's one-run audit: audit.canaries canaries, each included with probability 1/2; "
        "white-box gradient canaries trained with the config's DP-SGD settings (N, batch, epochs, epsilon, "
        "clipping, sampling, optimizer, ZeRO, precision; launch it on as many ranks as the run), or black-box "
        "input canaries in the config's own model and data (audit.kind=black_box); scored and turned into "
        "epsilon_lb at audit.confidence next to the claimed epsilon. Writes the tree RUN-audit (its own ledger; "
        "never release it). See docs/audit.md.")
    for name, (short, long) in phase_help.items():
        p = sub.add_parser(name, formatter_class=fmt, epilog=CONFIG_KEYS, help=short, description=f"{short}. {long}")
        _add_config_args(p)

    p = sub.add_parser("demo", formatter_class=fmt, epilog=CONFIG_KEYS,
                       help="the whole pipeline on the embedded default (minilm, generated sentiment data, CPU, offline W&B)",
                       description="Runs `dpc pipeline` on the embedded default config: all-MiniLM-L6-v2 fine-tuned "
                                   "with DP-SGD on a small generated sentiment set (teacher), distilled into a 3-layer "
                                   "student (DPKD), pruned to 50 percent sparsity (DPIMP), evaluated and exported, within "
                                   "one privacy budget; no data directory needed.")
    _add_config_args(p, config_required=False)

    p = sub.add_parser("submit", formatter_class=fmt, epilog=CONFIG_KEYS,
                       help="submit the run's phases as jobs (SLURM via submitit, local, debug), chained with afterok",
                       description="Each phase becomes one submitit job with the resources of the cluster section "
                                   "(nodes, tasks_per_node = GPUs per node, cpus_per_task, mem_gb, time_min, partition, "
                                   "account, qos, constraint, sbatch_extra). Prints job ids, log folder and run directory.")
    p.add_argument("--executor", choices=("slurm", "local", "debug"), help="overrides cluster.executor")
    p.add_argument("--phases", help="comma-separated phases to submit (default: pipeline.phases); `train` "
                                    "submits the single-phase `dpc train` job")
    _add_config_args(p)

    p = sub.add_parser("status", help="state of each phase job of a submitted run",
                       description="Reads RUN_DIR/jobs.json and asks the scheduler for each phase's state.")
    p.add_argument("run_dir", help="run directory (run.output_dir/run.name)")

    p = sub.add_parser("report", help="privacy report of a run tree: Markdown + plots (reads only; spends nothing)",
                       description="Recomputes the run tree's epsilon from RUN_DIR/privacy_ledger.json (PRV "
                                   "composition of all phases, RDP beside it) and writes privacy_report.md, "
                                   "epsilon_vs_step.png and accuracy_vs_size.png. See docs/report.md.")
    p.add_argument("run_dir", help="run directory (run.output_dir/run.name) of a `dpc train` or `dpc pipeline` run")
    p.add_argument("--output", metavar="DIR", help="where to write the report and plots (default: RUN_DIR/report)")

    p = sub.add_parser("config", formatter_class=fmt, epilog=CONFIG_KEYS,
                       help="validate a config and print it resolved (with overrides applied)",
                       description="Loads CONFIG, applies the overrides, validates every field and prints the "
                                   "resolved YAML, exactly as it would be saved in the run directory.")
    _add_config_args(p)
    return parser


DEMO_OVERRIDES = [
    "run.name=demo",
    # Only the data and the length of the run are cut (about 5 minutes of a laptop CPU); everything
    # else is the default recipe (docs/RESULTS.md), which the demo prints before it starts.
    "data.task=synthetic_sentiment",
    "model.name=minilm",
    "data.max_length=32",
    "train.epochs=2",
    "privacy.target_epsilon=8",
    "pipeline.phases=[teacher, distill, prune, eval, export]",
    "pipeline.budget_split={teacher: 0.5, distill: 0.3, prune: 0.2}",
    "prune.method=unstructured",
    "prune.target_sparsity=0.5",
    "prune.rounds=2",
]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`dpc submit cfg.yaml --executor slurm a.b=1`): argparse leaves
    # those as unknown arguments; they are overrides when they look like one.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    from dist_dpc.pipeline.config import load_config

    if args.command == "status":
        from launch.submit import status

        try:
            rows = status(args.run_dir)
        except FileNotFoundError as exc:
            print(f"dpc status: {exc}", file=sys.stderr)
            return 2
        for row in rows:
            print(f"{row['phase']:<10} job {row['job_id']:<10} {row['state']:<12} "
                  f"{'results written' if row['finished'] else ''}  logs: {row['logs']}")
        return 0
    if args.command == "report":
        from dist_dpc.pipeline.report import ReportError, summary_line, write_report

        try:
            print(summary_line(write_report(args.run_dir, args.output)))
        except ReportError as exc:
            print(f"dpc report: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "submit" and args.executor:
        args.overrides = [*args.overrides, f"cluster.executor={args.executor}"]
    try:
        if args.command == "demo":
            overrides = list(DEMO_OVERRIDES)
            overrides[0] = f"run.name=demo-{time.strftime('%Y%m%d-%H%M%S')}"
            cfg = load_config(None, overrides + args.overrides)
            print(describe_recipe(cfg))
        else:
            cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"dpc {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        import yaml

        from dist_dpc.utils.config_loader import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    _process_defaults()
    if args.command == "submit":
        from launch.submit import submit

        phases = tuple(x.strip() for x in args.phases.split(",")) if args.phases else None
        try:
            rows = submit(cfg, phases)
        except ValueError as exc:  # a setting a phase would refuse: nothing was submitted
            print(f"dpc submit: error: {exc}", file=sys.stderr)
            return 2
        for row in rows:
            if row["executor"] == "done":
                print(f"{row['phase']}: already completed, not submitted again")
                continue
            print(f"submitted {row['phase']}: job {row['job_id']} ({row['executor']}), logs in {row['logs']}")
        print(f"run directory: {os.path.join(cfg.run.output_dir, cfg.run.name)}  (dpc status "
              f"{os.path.join(cfg.run.output_dir, cfg.run.name)})")
        return 0
    from dist_dpc.pipeline.phases import run_phase, run_pipeline
    from dist_dpc.engine.dp_engine import PrivacyBudgetError
    from dist_dpc.privacy.ledger import PrivacyBudgetExceeded

    try:
        if args.command in ("pipeline", "demo"):
            run_pipeline(cfg)
        elif args.command == "audit":
            from dist_dpc.pipeline.audit import run_audit

            run_audit(cfg)
        else:
            run_phase(cfg, args.command)
    except (ValueError, FileNotFoundError, PrivacyBudgetExceeded, PrivacyBudgetError) as exc:
        # Configuration and privacy refusals: a plain message, no traceback to dig through.
        print(f"dpc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def describe_recipe(cfg) -> str:
    """What a run trains with, in a few lines (the demo shows the defaults this way)."""
    from dist_dpc.pipeline.config import AUTO_PROBE_EPOCHS

    m, t, p, h = cfg.model, cfg.train, cfg.privacy, cfg.head_init
    auto = "auto: on for a BERT-style head"
    lines = [
        f"teacher: {f'DP-LoRA r={m.lora.r} alpha={m.lora.alpha:g}' if m.lora else 'full fine-tuning'} of {m.name}"
        f"{', embeddings frozen' if m.freeze_embeddings else ''}, "
        f"{'pre-trained dropout' if m.dropout is None else 'dropout off' if m.dropout == 0 else f'dropout {m.dropout:g}'}; "
        f"head_init: centred pooler "
        f"{auto if h.centre_pooler is None else h.centre_pooler}, DP probe "
        f"{f'{auto}, {AUTO_PROBE_EPOCHS:g} epochs' if h.probe_epochs is None else f'{h.probe_epochs:g} epochs'}, "
        f"DP mean sigma {'scaled to N: 0.06 N / sqrt(width) within [5, 20]' if h.mean_noise_multiplier is None else f'{h.mean_noise_multiplier:g}'}",
        f"training: expected batch {t.batch_size}, {t.epochs:g} epochs, {t.optimizer} lr {t.lr:g} "
        f"({t.lr_schedule}, {t.warmup_steps} warm-up steps); DP: epsilon {p.target_epsilon} in total, "
        f"C={p.max_grad_norm:g} ({p.clipping}), {p.sampling} sampling, {p.accountant} accountant",
        f"compression: distill trains {cfg.distill.trainable} at lr {cfg.distill.lr or t.lr:g}; prune "
        f"({cfg.prune.method}) trains {cfg.prune.trainable} at lr {cfg.prune.lr or t.lr:g}",
    ]
    return "\n".join(["dpc demo: the default recipe (docs/RESULTS.md); data and epochs cut to fit a CPU", *lines])


def _process_defaults() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "offline")


if __name__ == "__main__":
    sys.exit(main())
