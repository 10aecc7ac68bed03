"""Reading delimited and JSON-lines files by column name, with errors that name file and column."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def require_file(path: str | Path, field: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{field}: file {str(p)!r} does not exist")
    return p


def read_rows(path: Path, quoting_none: bool = False) -> tuple[list[str], list[dict]]:
    """(columns, rows) of a .csv, .tsv or .jsonl file. GLUE's TSVs are unquoted: ``quoting_none``."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        columns = sorted({k for r in rows for k in r})
        return columns, rows
    delimiter = "\t" if suffix == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter, quoting=csv.QUOTE_NONE if quoting_none else csv.QUOTE_MINIMAL)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def require_columns(path: Path, columns: list[str], needed: list[str]) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(f"{str(path)!r} has no column {', '.join(repr(m) for m in missing)}; "
                         f"its columns are: {', '.join(columns)}")
