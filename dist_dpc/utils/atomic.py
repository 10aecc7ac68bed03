"""Whole-file replacement: a reader (or a restarted job) sees the old file or the new one, never half.

Also where secret-holding paths get their permissions: files 0600 in directories 0700 (the run root,
its cache of tokenised private data, checkpoints, the insecure-mode seed file), so other users of a
shared cluster cannot read what would void the DP guarantee or reveal the data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def private_dir(path: str | Path) -> Path:
    """Create ``path`` (and missing parents, with the default mode) and make ``path`` itself 0700."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    os.chmod(path, PRIVATE_DIR)  # mkdir's mode is masked by the umask and ignored for an existing dir
    return path


def make_private_tree(root: str | Path) -> None:
    """chmod everything under ``root`` (itself included): directories 0700, files 0600. For trees
    written by code that does not take a mode (DeepSpeed's checkpoints). Vanishing entries are skipped."""
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name, mode in [(d, PRIVATE_DIR) for d in dirnames] + [(f, PRIVATE_FILE) for f in filenames]:
            try:
                os.chmod(os.path.join(dirpath, name), mode, follow_symlinks=False)
            except (FileNotFoundError, NotImplementedError):
                pass
    if root.is_dir():
        os.chmod(root, PRIVATE_DIR)


def atomic_write(path: str | Path, write: Callable[[Path], None], mode: int | None = None) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary name carries the process id, so ranks racing on the same file (the tokenisation
    cache) each rename a complete file of their own. With ``mode`` (e.g. PRIVATE_FILE) the temporary
    file has that mode before a byte is written, so a secret is never readable by others, even
    briefly. (The privacy ledger has its own writer: it also fsyncs, and dist_dpc.privacy depends on
    nothing but torch and opacus.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        if mode is not None:
            os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode))
            os.chmod(tmp, mode)
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)  # in case ``write`` replaced the file instead of writing into it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
