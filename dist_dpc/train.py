"""Entry for launchers: ``torchrun ... -m dist_dpc.train CONFIG [overrides]``,
``deepspeed --module dist_dpc.train CONFIG [overrides]`` or ``srun python -m dist_dpc.train CONFIG``.

The deepspeed launcher appends ``--local_rank=N``; the rank comes from the environment anyway.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from dist_dpc.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if not a.startswith("--local_rank")]
    return cli_main(["train", *args])


if __name__ == "__main__":
    sys.exit(main())
