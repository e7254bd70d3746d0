"""Data-parallel training of one network over several Ray Train workers (a GPU each, or CPUs).

A phase that trains one network per Ray Tune trial can give each trial several workers: the trial
becomes the driver of a Ray Train run whose workers each hold a replica, train on their share of
every pass and average gradients (:func:`eta.train.fit` with ``data_parallel``). Ray Train starts
the process group (NCCL on GPUs, Gloo on CPUs) and places the workers; what the workers report
reaches the trial's Tune session, so progress bars and trial results are the same as with one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass(frozen=True)
class Rank:
    """Where this worker stands in its data-parallel group."""

    rank: int
    world: int
    device: torch.device

    @property
    def leader(self) -> bool:
        """Rank 0 writes results and logs; the others only train."""
        return self.rank == 0


def worker_rank() -> Rank:
    """This Ray Train worker's rank, group size and device (its GPU, or the CPU)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return Rank(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())


def report(metrics: dict) -> None:
    """Report from every worker (Ray Train waits for all of them); rank 0's metrics are kept."""
    import ray.train

    ray.train.report(metrics)


def train_data_parallel(worker: Callable[[dict], None], config: dict, *, workers: int, cpus_per_worker: float,
                        gpus_per_worker: float, storage: Path, name: str, in_tune_trial: bool = False,
                        max_failures: int = 0) -> None:
    """Run ``worker(config)`` on ``workers`` Ray Train workers and wait for them.

    ``in_tune_trial``: called inside a Ray Tune trial, whose session receives the workers' reports.
    Raises the workers' error (after ``max_failures`` restarts of the whole group).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    callbacks = []
    if in_tune_trial:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker > 0 else {})}
    trainer = TorchTrainer(
        worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=str(Path(storage).resolve()), callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
