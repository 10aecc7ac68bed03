"""Entry for launchers: ``torchrun ... -m dist_dpc.train CONFIG [--phase NAME] [overrides]``,
``deepspeed --module dist_dpc.train CONFIG ...`` or ``srun python -m dist_dpc.train CONFIG ...``.

``--phase`` picks the phase (train, teacher, distill, prune, eval, export, pipeline; default train).
The deepspeed launcher appends ``--local_rank=N``; the rank comes from the environment anyway.
"""

from __future__ import annotations

import sys

PHASES = ("train", "teacher", "distill", "prune", "eval", "export", "pipeline", "audit")


def main(argv: list[str] | None = None) -> int:
    from dist_dpc.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if not a.startswith("--local_rank")]
    phase = "train"
    for i, a in enumerate(args):
        if a == "--phase" and i + 1 < len(args):
            phase = args[i + 1]
            del args[i:i + 2]
            break
        if a.startswith("--phase="):
            phase = a.split("=", 1)[1]
            del args[i]
            break
    if phase not in PHASES:
        print(f"dist_dpc.train: --phase {phase!r} is invalid: allowed {', '.join(PHASES)}", file=sys.stderr)
        return 2
    return cli_main([phase, *args])


if __name__ == "__main__":
    sys.exit(main())
