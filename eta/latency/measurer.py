"""Where and how one search measures: backend, target, device name, schedule policy, protocol, node.

``node_resource`` names a Ray custom resource (``latency:rpi4``); measurements then run as Ray tasks
on the node that holds it, one at a time, and the target and device name are read on that node.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..errors import EtaError
from . import backends
from .backends import measure_entry
from .protocol import Protocol
from .table import LatencyTable, default_table_path


@dataclass
class Measurer:
    backend: str
    target: dict
    device: str
    protocol: Protocol
    schedule: str = "untuned"
    node_resource: str | None = None

    @classmethod
    def create(cls, backend: str, target_kind: str, protocol: Protocol, schedule: str, node_resource: str | None = None) -> "Measurer":
        """Read the target where it will be measured (tuned TVM: a portable CPU where the host allows one)."""
        backends.get(backend)  # one line for an unknown backend
        if node_resource:
            import ray

            if not ray.is_initialized():
                raise EtaError(f"latency.node_resource {node_resource!r} needs a Ray cluster (pass --address)")
            if node_resource not in ray.cluster_resources():
                raise EtaError(f"latency.node_resource: no node of the Ray cluster has resource {node_resource!r}; start one with "
                               f"ray start --address=<head> --resources='{{\"{node_resource}\": 1}}'")
            task = ray.remote(describe_target).options(num_cpus=0, resources={node_resource: 0.001})
            target, device = _get_from_node(task.remote(backend, target_kind, schedule), node_resource)
        else:
            target, device = describe_target(backend, target_kind, schedule)
        return cls(backend, target, device, protocol, schedule, node_resource)

    def executor(self):
        """How one table entry is measured: here, or as a Ray task on the node with ``node_resource``."""
        if not self.node_resource:
            return measure_entry
        import ray

        # one measurement at a time on that node, holding all of its latency resource, so nothing else runs beside it
        task = ray.remote(measure_entry).options(num_cpus=1, resources={self.node_resource: 1}, max_retries=2)
        resource = self.node_resource

        def run_on_node(provenance, module, shape, bits, database_dir, key=None):
            return _get_from_node(task.remote(provenance, module, shape, bits, database_dir, key), resource)

        return run_on_node

    def table_path(self, root: Path | None = None) -> Path:
        return default_table_path(root or paths.latency_tables_dir(), self.backend, self.target, self.device, self.schedule)

    def open_table(self, root: Path | None = None) -> LatencyTable:
        """The shared table of this target, started from a shipped reference table when the cache has none."""
        path = self.table_path(root)
        if root is None and not path.exists():
            seed = _reference_table(path)
            if seed is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(seed, path)
        return LatencyTable.open(path, backend=self.backend, target=self.target, device=self.device, protocol=self.protocol,
                                 schedule=self.schedule, passes=2)


def describe_target(backend: str, kind: str, schedule: str | None = None) -> tuple[dict, str]:
    """The target dict and device name of the machine this runs on (called on the measuring node)."""
    b = backends.get(backend)
    return b.describe_target(kind, schedule or b.default_schedule)


def _reference_table(path: Path) -> Path | None:
    """The shipped reference table at the same place (target folder and file name) as ``path``, if any."""
    ref = paths.reference_dir()
    if ref is None or paths.tables_overridden():
        return None
    seed = ref / "latency" / path.parent.name / path.name
    return seed if seed.is_file() else None


def _get_from_node(ref, resource: str, timeout_s: float = 3600):
    import ray

    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        raise EtaError(f"no Ray node with resource {resource!r} measured within {timeout_s:.0f} s "
                       f"(start one with: ray start --address=... --resources='{{\"{resource}\": 1}}')")
    return ray.get(ref)
