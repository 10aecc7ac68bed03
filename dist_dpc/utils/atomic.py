"""Whole-file replacement: a reader (or a restarted job) sees the old file or the new one, never half."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary name carries the process id, so ranks racing on the same file (the tokenisation
    cache) each rename a complete file of their own. (The privacy ledger has its own writer: it
    also fsyncs, and dist_dpc.privacy depends on nothing but torch and opacus.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
