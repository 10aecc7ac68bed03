"""Read an offline W&B run file (run-*.wandb) back: a LevelDB-style log of protobuf Records.

Independent of the code that wrote it: this parses the bytes on disk, so a test sees exactly what
`wandb sync` would upload.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7  # ":W&B" + magic 0xBEE1 + version byte


def records(path: str | Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        block_left = BLOCK - (pos % BLOCK)
        if block_left < 7:  # trailer padding at the end of a block
            pos += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending + payload)
            pending = b""
            yield record
        else:  # FIRST or MIDDLE
            pending += payload


def read_run(run_dir: str | Path) -> dict:
    """{"history": [{key: value}], "summary": {...}, "config": {...}, "run": {...}} of one offline run."""
    (path,) = list(Path(run_dir).glob("run-*.wandb"))
    out = {"history": [], "summary": {}, "config": {}, "run": {}}
    for record in records(path):
        which = record.WhichOneof("record_type")
        if which == "history":
            out["history"].append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
        elif which == "summary":
            for item in record.summary.update:
                out["summary"][item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
        elif which == "config":
            for item in record.config.update:
                out["config"][item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
        elif which == "run":
            run = record.run
            out["run"] = {"id": run.run_id, "group": run.run_group, "job_type": run.job_type, "project": run.project}
            for item in run.config.update:
                out["config"][item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
    return out
