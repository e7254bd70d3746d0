"""Read the records of an offline W&B run file, so tests can check what a search logged without an account.

The ``.wandb`` file is a 7-byte header (``:W&B``, a magic number, a version) followed by records in
LevelDB's log format: 32 KiB blocks of chunks, each chunk a 7-byte header (CRC32, length, type:
1 full, 2 first, 3 middle, 4 last) and its bytes; each record is a serialized ``wandb.Record``.
"""
from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer: zero padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec
            pending = b""


def summarize(run_dir: Path) -> dict:
    """What one offline run holds: its job type and group, config keys, history keys, artifacts, media files."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    out = {"job_type": None, "group": None, "config": set(), "history": set(), "summary": set(), "artifacts": [], "files": set()}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["job_type"], out["group"] = rec.run.job_type, rec.run.run_group
            out["config"] |= {u.key for u in rec.run.config.update}
        elif kind == "config":
            out["config"] |= {u.key for u in rec.config.update}
        elif kind == "history":
            out["history"] |= {i.key or "/".join(i.nested_key) for i in rec.history.item}
        elif kind == "summary":
            out["summary"] |= {i.key or "/".join(i.nested_key) for i in rec.summary.update}
        elif kind == "artifact":
            out["artifacts"].append({"name": rec.artifact.name, "type": rec.artifact.type, "metadata": rec.artifact.metadata,
                                     "files": [e.path for e in rec.artifact.manifest.contents]})
    out["files"] = {str(p.relative_to(run_dir)) for p in Path(run_dir, "files").rglob("*") if p.is_file()}
    return out
