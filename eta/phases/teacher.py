"""Phase ``teacher``: the network students are made from — the user's checkpoint, timm's pretrained
weights, or one eta trains itself — and its test accuracy at every resolution of the space."""
from __future__ import annotations

import logging
import time

from ..augment import for_space
from ..devices import pick_device
from ..files import save_tensors
from ..teachers import pretrained_state
from ..threads import cores_idle_while_training
from ..train import evaluate, fit
from .context import PhaseContext

log = logging.getLogger(__name__)

NAME = "teacher"


def load(ctx: PhaseContext) -> dict:
    """A finished phase: the teacher's weights into the bound space, its record from the manifest."""
    ctx.bound.load_teacher_weights(ctx.teacher_path)
    return ctx.run.phase_info(NAME)


def idle_cores(ctx: PhaseContext) -> int:
    """CPU cores this phase leaves to other work (compiling the latency table) while it trains the teacher; none
    when it trains nothing (a checkpoint, pretrained weights): it ends at once."""
    if ctx.space.teacher.checkpoint or ctx.space.teacher.pretrained:
        return 0
    return cores_idle_while_training(pick_device(1))


def run(ctx: PhaseContext) -> dict:
    space, bound = ctx.space, ctx.bound
    t0 = time.time()
    if space.teacher.checkpoint:
        bound.load_teacher_weights(ctx.teacher_path)
    elif space.teacher.pretrained:
        bound.teacher.load_state_dict(pretrained_state(space.teacher.model, bound))
        save_tensors(ctx.teacher_path, bound.teacher.state_dict(), {"model": space.teacher.model, "source": "timm pretrained"})
    else:
        tc = space.teacher.train
        log.info("teacher: training %s on %s (%d epochs)", space.teacher.model, space.data.dataset, tc.epochs)
        device = pick_device(1)  # the driver's GPU, when it has one
        fit(bound.teacher, ctx.splits.train, epochs=tc.epochs, lr=tc.lr, weight_decay=tc.weight_decay, batch_size=tc.batch_size,
            resolutions=[space.data.resolution], label_smoothing=tc.label_smoothing, seed=space.seed, desc="teacher",
            progress=ctx.progress, augment=for_space(space, ctx.splits.num_classes), amp=tc.amp, device=device)
        bound.teacher.cpu()
        save_tensors(ctx.teacher_path, bound.teacher.state_dict(), {"model": space.teacher.model})
    bound.rethin()
    acc = {str(r): evaluate(bound.teacher, ctx.splits.test, resolution=r) for r in space.resolutions}
    with ctx.tracker(NAME) as tr:
        tr.summary(**{f"teacher_test_acc@{r}": a for r, a in acc.items()})
    log.info("teacher: test accuracy %.4f at %d px", acc[str(space.data.resolution)], space.data.resolution)
    return {"checkpoint": str(ctx.teacher_path), "test_acc": acc, "train_s": time.time() - t0}
