"""The latency lookup table: one JSON file per (backend, target, device), shared across searches.

Format (``eta-latency-table/1``)::

    {"format": ..., "provenance": {backend, target, tvm_version, torch_version, device, created, protocol},
     "entries": {key: {signature, input_shape, bits, executable, median_ms, spread, repeats,
                       samples_ms, number, compile_s, timing_s, protocol, measured_at}},
     "stale": [{"provenance": ..., "entries": ...}, ...]}

A key is ``signature|input shape|bits``; the signature names the operator and hashes its
structure. Entries measured under different provenance (another backend, target, device, or
version of the software that runs them: TVM for ``tvm``, PyTorch for ``torch``) are never reused:
opening such a file warns, and the next save moves its entries aside into ``stale``.
A bit-width other than 32 is recorded as not executable (no integer kernels yet) rather than
silently timed in float.
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Callable

from ..errors import EtaError
from .protocol import Measurement, Protocol

log = logging.getLogger(__name__)

FORMAT = "eta-latency-table/1"
# what must match for an entry to be reused, besides the version of the backend's own software
PROVENANCE_KEYS = ("backend", "target", "device")
BACKEND_VERSION_KEY = {"tvm": "tvm_version", "torch": "torch_version"}


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg, key in (("apache-tvm", "tvm_version"), ("torch", "torch_version")):
        try:
            out[key] = md.version(pkg)
        except md.PackageNotFoundError:
            out[key] = None
    return out


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:60]


def default_table_path(root, backend: str, target: dict, device: str) -> Path:
    tgt = "-".join(str(target.get(k)) for k in ("kind", "mcpu", "arch") if target.get(k))
    return Path(root) / _slug(tgt) / f"{backend}-{_slug(device)}.json"


def _provenance_keys(backend: str) -> tuple:
    return PROVENANCE_KEYS + (BACKEND_VERSION_KEY.get(backend, "tvm_version"),)


def _same_provenance(old: dict, new: dict) -> bool:
    return all(old.get(k) == new.get(k) for k in _provenance_keys(new.get("backend")))


class LatencyTable:
    """Measured milliseconds per (operator signature, input shape, bit-width) on one target."""

    def __init__(self, path: Path, provenance: dict, entries: dict, stale: list):
        self.path = Path(path)
        self.provenance = provenance
        self.entries = entries
        self.stale = stale

    @classmethod
    def open(cls, path, *, backend: str, target: dict, device: str, protocol: Protocol | None = None) -> "LatencyTable":
        prov = {"backend": backend, "target": target, "device": device, **_versions(),
                "created": time.strftime("%Y-%m-%d"), "protocol": (protocol or Protocol()).to_dict()}
        path = Path(path)
        entries, stale = {}, []
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise EtaError(f"corrupt latency table {path}: {err.msg} at line {err.lineno}") from None
            old = data.get("provenance", {})
            if _same_provenance(old, prov):
                entries = data.get("entries", {})
                prov["created"] = old.get("created", prov["created"])
            else:
                changed = [k for k in _provenance_keys(backend) if old.get(k) != prov[k]]
                log.warning("latency table %s was measured with another %s: its entries are not reused", path, "/".join(changed))
                stale = data.get("stale", []) + [{"provenance": old, "entries": data.get("entries", {})}]
            stale = data.get("stale", []) if not stale else stale
        return cls(path, prov, entries, stale)

    @staticmethod
    def key(signature: str, input_shape: tuple, bits: int = 32) -> str:
        return f"{signature}|{'x'.join(str(int(d)) for d in input_shape)}|w{bits}"

    def get(self, signature: str, input_shape: tuple, bits: int = 32) -> float | None:
        e = self.entries.get(self.key(signature, input_shape, bits))
        if e is None or not e.get("executable", True):
            return None
        return float(e["median_ms"])

    def entry(self, signature: str, input_shape: tuple, bits: int = 32) -> dict | None:
        return self.entries.get(self.key(signature, input_shape, bits))

    def save(self) -> None:
        """Write atomically, first taking in entries another process added to the same file meanwhile."""
        from ..runs import write_json

        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            data = {}
        if _same_provenance(data.get("provenance", {}), self.provenance):
            for key, entry in data.get("entries", {}).items():
                self.entries.setdefault(key, entry)
        write_json(self.path, {"format": FORMAT, "provenance": self.provenance, "entries": self.entries, "stale": self.stale})

    def _measure(self, module, input_shape) -> Measurement:
        prov = self.provenance
        protocol = Protocol(**prov["protocol"])
        if prov["backend"] == "tvm":
            from . import tvm_backend

            return tvm_backend.measure(module, input_shape, prov["target"], protocol)
        from . import torch_backend

        return torch_backend.measure(module, input_shape, device=prov["target"].get("kind", "cpu"), protocol=protocol)

    def measure_many(self, items: list[tuple[str, Callable, tuple, int]], desc: str = "latency", progress: bool = True) -> dict:
        """Measure every item not yet in the table; the file is saved after each entry (resumable)."""
        from tqdm.auto import tqdm

        todo = [it for it in items if self.key(it[0], it[2], it[3]) not in self.entries]
        if todo:
            log.info("%s: measuring %d of %d entries (%d cached)", desc, len(todo), len(items), len(items) - len(todo))
        for signature, factory, shape, bits in tqdm(todo, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
            key = self.key(signature, shape, bits)
            if key in self.entries:  # the same workload listed twice
                continue
            base = {"signature": signature, "input_shape": list(shape), "bits": bits, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if bits != 32:
                self.entries[key] = {**base, "executable": False, "reason": f"{bits}-bit execution is not built for backend {self.provenance['backend']} yet"}
            else:
                m = self._measure(factory(), shape)
                self.entries[key] = {**base, "executable": True, "median_ms": m.median_ms, "spread": m.spread, "repeats": m.repeats,
                                     "samples_ms": m.samples_ms, "number": m.number, "compile_s": m.compile_s, "timing_s": m.timing_s,
                                     "protocol": self.provenance["protocol"]}
            self.save()
        return {self.key(s, sh, b): self.get(s, sh, b) for s, _, sh, b in items}
