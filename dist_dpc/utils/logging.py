"""Rank-0 console output; warnings that must not be missed go to every rank's stderr."""

from __future__ import annotations

import sys


def log(world, message: str) -> None:
    if world is None or world.is_main:
        print(message, flush=True)


def warn_loudly(world, message: str) -> None:
    if world is None or world.is_main:
        bar = "!" * 72
        print(f"{bar}\nWARNING: {message}\n{bar}", file=sys.stderr, flush=True)
