"""Dev accuracy of a phase's model right after its head_init (before its DP fine-tuning), rebuilt
from what the run tree saved: the phase's input model, then head_init.pt. Shows how much of a row
of docs/RESULTS.md the probe gives and how much the fine-tuning adds. Reads no training data.

    python bench/after_head_init.py runs/results4/teacher:teacher runs/results4/teacher:distill ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from dist_dpc.compress.distill import student_from_teacher, transformer_layers
from dist_dpc.compress.pruning import apply_masks
from dist_dpc.data import load_task, resolve_num_labels, tokenize_split
from dist_dpc.models import load_sequence_classifier, load_tokenizer
from dist_dpc.models.heads import pooled_head
from dist_dpc.pipeline.config import load_config
from dist_dpc.pipeline.phases import load_model_dir
from dist_dpc.pipeline.trainer import evaluate


def input_model(tree: Path, phase: str, cfg, num_labels: int, tokenizer) -> tuple[torch.nn.Module, Path]:
    """The model the phase's (last) head_init started from, and the directory of its head_init.pt."""
    if phase in ("teacher", "train"):  # `dpc train` keeps its phase files in the run directory itself
        model = load_sequence_classifier(cfg.model, num_labels, tokenizer, seed=cfg.run.seed)
        return model, tree / "teacher" if phase == "teacher" else tree
    if phase == "distill":
        teacher = load_model_dir(Path(cfg.distill.teacher or tree / "teacher" / "model"), cfg, num_labels, tokenizer)
        # The map the phase used (results.json; older runs only name it in student_init).
        trained = json.loads((tree / "distill" / "results.json").read_text())
        layer_map = trained.get("layer_map") or json.loads(trained["student_init"].removeprefix("teacher layers "))
        return student_from_teacher(teacher, layer_map), tree / "distill"
    if phase == "prune":
        rounds = cfg.prune.rounds
        last = tree / "prune" / f"round{rounds}"
        previous = tree / "prune" / f"round{rounds - 1}" / "model" if rounds > 1 else Path(cfg.prune.source)
        model = load_model_dir(previous, cfg, num_labels, tokenizer)
        if cfg.prune.method == "structured":
            before = (json.loads((previous.parent / "done.json").read_text())["kept_layers"] if rounds > 1
                      else list(range(len(transformer_layers(model)[0]))))
            after = json.loads((last / "done.json").read_text())["kept_layers"]
            model = student_from_teacher(model, [before.index(i) for i in after])
        else:
            apply_masks(model, torch.load(last / "masks.pt"))
        return model, last
    raise ValueError(f"phase {phase!r}: train, teacher, distill or prune")


def main(specs: list[str]) -> None:
    for spec in specs:
        tree, phase = spec.rsplit(":", 1)
        tree = Path(tree)
        cfg = load_config(str(tree / "config.yaml"))
        tokenizer = load_tokenizer(cfg.model)
        task = load_task(cfg.data)
        model, head_dir = input_model(tree, phase, cfg, resolve_num_labels(task, cfg.model.num_labels), tokenizer)
        state = torch.load(head_dir / "head_init.pt", weights_only=True)
        head = pooled_head(model, "bench/after_head_init.py")
        head.pooler.load_state_dict(state["pooler"])
        head.classifier.load_state_dict(state["classifier"])
        dev = tokenize_split(task.eval["validation"], tokenizer, cfg.data.max_length)
        with torch.no_grad():
            before = evaluate(model.eval(), dev, tokenizer.pad_token_id, 256)["accuracy"]
        results = tree / "results.json" if phase == "train" else tree / phase / "results.json"
        after = json.loads(results.read_text())["metrics"]["validation"]["accuracy"]
        print(f"| {tree.name}:{phase} | {100 * before:.2f} % | {100 * after:.2f} % |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
