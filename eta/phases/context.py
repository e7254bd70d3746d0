"""What every phase works with: the space, the bound teacher, the data, the run directory, Ray, W&B."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from ..bound import BoundSpace
from ..raycluster import ray_session
from ..runs import Run
from ..space import SearchSpace
from ..tracking import PhaseTracker


@dataclass
class PhaseContext:
    space: SearchSpace
    bound: BoundSpace
    splits: object  # eta.data.DataSplits
    run: Run
    progress: bool = True
    address: str | None = None
    num_cpus: int | None = None

    def ray(self):
        """A Ray session: the cluster at ``address``, or a local one started (and stopped) here."""
        return ray_session(self.address, num_cpus=self.num_cpus)

    def latency_session(self):
        """A Ray session when a named node measures latency or named nodes tune; nothing otherwise."""
        cfg = self.space.latency
        return self.ray() if cfg.node_resource or cfg.tune.nodes else nullcontext()

    def tracker(self, phase: str) -> PhaseTracker:
        t = self.space.tracking
        return PhaseTracker(self.run.root, phase, mode=t.wandb, project=t.project, config=self.space.to_dict())

    @property
    def teacher_path(self) -> Path:
        """The teacher's weights: the user's checkpoint, or the ones eta trained into the run."""
        ck = self.space.teacher.checkpoint
        return Path(ck) if ck else self.run.teacher_weights
