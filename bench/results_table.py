"""Markdown table of the SST-2 compression rows written by bench/sst2_results.sh (docs/RESULTS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [  # label, run tree, phase
    ("non-private teacher (6 layers)", "nonprivate", "teacher"),
    ("DP teacher (6 layers)", "teacher", "teacher"),
    ("DPKD student (3 layers: teacher layers 0, 2, 4)", "teacher", "distill"),
    ("DP-SGD-only student (same init, no KD)", "baseline", "distill"),
    ("DPKD student, teacher layers 0, 2, 5", "kd-last", "distill"),
    ("DP-SGD-only student, teacher layers 0, 2, 5", "baseline-last", "distill"),
    ("structured DPIMP (6 -> 3 layers)", "structured", "prune"),
    ("unstructured DPIMP (50 %)", "unstructured", "prune"),
    ("2:4 DPIMP", "two-four", "prune"),
]


def main(out: str) -> None:
    root = Path(out)
    print("| model | dev accuracy | vs DP teacher | layers | parameters | non-zero | size (MB) | epsilon (delta) |")
    print("|---|---|---|---|---|---|---|---|")
    teacher_acc = None
    for label, tree, phase in ROWS:
        eval_file = root / tree / "eval" / "results.json"
        if not eval_file.is_file():
            print(f"| {label} | (not run) | | | | | | |")
            continue
        rows = {r["phase"]: r for r in json.loads(eval_file.read_text())["models"]}
        row = rows[phase]
        acc = row["metrics"]["validation"]["accuracy"] * 100
        if tree == "teacher" and phase == "teacher":
            teacher_acc = acc
        trained = json.loads((root / tree / phase / "results.json").read_text())
        eps = "none (not private)" if not trained["private"] else f"{trained['epsilon']:.2f} ({trained['delta']:.2g})"
        delta = f"{acc - teacher_acc:+.2f}" if teacher_acc is not None and label != "DP teacher (6 layers)" else ""
        print(f"| {label} | {acc:.2f} % | {delta} | {row['layers']} | {row['parameters'] / 1e6:.2f} M | "
              f"{row['nonzero_parameters'] / 1e6:.2f} M | {row['size_mb']:.1f} | {eps} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/results")
