"""Progress on rank 0: a tqdm bar with epsilon in the postfix on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, world, total: int, initial: int, desc: str):
        self.world = world
        self.bar = None
        if world.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        self.total = total

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, metrics: dict, elapsed: float) -> None:
        if not self.world.is_main:
            return
        eps = metrics.get("privacy/epsilon")
        if self.bar is not None:
            post = {"loss": f"{metrics['train/loss']:.4f}"}
            if eps is not None:
                post["eps"] = f"{eps:.3f}"
            self.bar.set_postfix(post)
            return
        # Batch jobs: one plain line per report (no carriage-return noise in SLURM logs).
        parts = [f"step {step}/{self.total}", f"loss={metrics['train/loss']:.4f}", f"batch={metrics['train/batch_size']}"]
        if eps is not None:
            parts += [f"clipped={metrics['privacy/clipped_fraction']:.2f}", f"eps={eps:.3f}"]
        parts.append(f"{metrics['perf/samples_per_s']:.1f} samples/s ({elapsed:.0f}s)")
        print(" ".join(parts), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
