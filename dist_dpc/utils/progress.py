"""Progress on rank 0: a tqdm bar (epsilon, eval metrics) on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys


# Short names of the step metrics shown when present, in this order.
_SHORT = {"train/loss": "loss", "train/batch_size": "batch", "privacy/clipped_fraction": "clipped",
          "privacy/epsilon": "eps"}


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


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
        """Prints what ``metrics`` holds: under DP that is epsilon, throughput and the evaluation
        metrics; the exact train loss, batch size and clipped fraction only where step_metrics
        released them."""
        if not self.world.is_main:
            return
        if self.bar is not None:
            self.bar.set_postfix({_SHORT.get(k) or k.removeprefix("eval/"): _fmt(v) for k, v in metrics.items()
                                  if k in _SHORT or k.startswith("eval/")})
            return
        # Batch jobs: one plain line per report (no carriage-return noise in SLURM logs).
        parts = [f"step {step}/{self.total}"]
        parts += [f"{_SHORT[k]}={_fmt(metrics[k])}" for k in _SHORT if k in metrics]
        parts += [f"{k.removeprefix('eval/')}={_fmt(v)}" for k, v in metrics.items() if k.startswith("eval/")]
        if "perf/samples_per_s" in metrics:
            parts.append(f"{metrics['perf/samples_per_s']:.1f} samples/s ({elapsed:.0f}s)")
        print(" ".join(parts), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
