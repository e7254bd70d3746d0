"""Connecting to Ray: a local single-machine cluster by default, or an existing one by address."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None):
    """Use a running Ray session if there is one, else start (and later stop) one.

    ``address``: ``auto``, ``ray://host:10001``, ``host:6379``, or None for a local cluster bound
    to loopback with ``num_cpus`` CPUs (default: all).
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    kwargs = dict(include_dashboard=False, configure_logging=True, logging_level=logging.WARNING, log_to_driver=False)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(
            address="local",  # a new cluster of our own, even when another one runs on this machine
            num_cpus=num_cpus or os.cpu_count(),
            num_gpus=num_gpus,
            _node_ip_address="127.0.0.1",
            **kwargs,
        )
    try:
        yield ray
    finally:
        ray.shutdown()


def cpu_slots(task_cpus: float) -> int:
    """How many tasks of ``task_cpus`` CPUs the connected cluster runs at once."""
    import ray

    total = ray.cluster_resources().get("CPU", 1)
    return max(1, int(total // max(task_cpus, 1e-9)))
