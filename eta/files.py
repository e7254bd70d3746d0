"""Files written so that a crash never leaves half of one: write beside, then rename into place.

JSON for records, safetensors for weights (nothing loaded from disk is executed); a missing or
corrupt file becomes one line naming it.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import EtaError


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=float) + "\n")


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EtaError(f"missing file: {path}") from None
    except json.JSONDecodeError as err:
        raise EtaError(f"corrupt JSON in {path}: {err.msg} at line {err.lineno}") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise EtaError(f"missing weights file: {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types for truncated or foreign files
        with open(path, "rb") as f:
            head = f.read(2)
        hint = ""
        if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save's zip, or a bare pickle
            hint = ("; it looks like a pickled PyTorch checkpoint, which eta never unpickles: convert it with "
                    "safetensors.torch.save_file(torch.load(path, weights_only=True), 'weights.safetensors')")
        raise EtaError(f"corrupt weights file {path}: {str(err).splitlines()[0]}{hint}") from None
