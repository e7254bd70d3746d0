"""Phase 2's quantization term: bit-widths chosen jointly with the operators (thesis §14.1, HAWQV3).

A space with ``bits: [32, 8, 4]`` offers each conv operator at every bit-width. The accuracy
predictor is trained on float students (proxy accuracy does not depend on a bit-width yet to be
chosen), so the options of one operator at different bit-widths share the predictor's input; what
separates them is the latency the table measured with integer kernels and a modelled accuracy
drop. The drop is proportional to the quantization mismatch (after HAWQ-V2): for each block and
operator, Ω_b = ‖Q_b(op)(x) − op(x)‖² / ‖op(x)‖² on the block's real inputs (weights and
activations quantized together, the error propagated through the operator), and
drop_b = λ·Ω_b, with λ fitted by least squares to the proxy-accuracy drops measured when each
quantized operator is swapped into the teacher. 8-bit drops alone are mostly below the proxy
split's resolution (one image), so every bit-width of the space takes part in the fit; the model
still ranks and smooths what one proxy split measures. The solver then maximises
predictor(S) − Σ drop.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from . import families
from .arch import OpSpec
from .bound import BoundSpace
from .data import batches
from .errors import EtaError
from .quant import mismatch, quantize_operator
from .quant.network import quantize_student
from .student import arch_bits, count_macs
from .threads import torch_threads
from .train import evaluate, recalibrate_bn

log = logging.getLogger(__name__)


def float_projection(bound: BoundSpace) -> tuple[list[list[OpSpec]], list[np.ndarray]]:
    """Per block: the distinct float operators, and for every option the index of its float operator."""
    floats, index = [], []
    for opts in bound.options:
        f = list(dict.fromkeys(s.with_bits(32) for s in opts))
        floats.append(f)
        index.append(np.array([f.index(s.with_bits(32)) for s in opts]))
    return floats, index


def is_mixed(bound: BoundSpace) -> bool:
    return any(s.bits != 32 for opts in bound.options for s in opts)


def project(choices, index: list[np.ndarray]) -> tuple[int, ...]:
    """An architecture's choices mapped onto the float operators (what the predictor sees)."""
    return tuple(int(index[b][j]) for b, j in enumerate(choices))


def expand_first_layer(layers: list[tuple[np.ndarray, np.ndarray]], index: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """A predictor over float one-hot inputs as a predictor over all options (bit variants share columns)."""
    (W1, b1), rest = layers[0], layers[1:]
    sizes = [int(i.max()) + 1 for i in index]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    cols = np.concatenate([offsets[b] + idx for b, idx in enumerate(index)])
    return [(np.asarray(W1)[:, cols], b1), *rest]


def block_inputs(student, dataset, *, block: int, resolution: int, n_batches: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """What block ``block`` of ``student`` receives on a few training batches (for calibration)."""
    out = []
    with torch.no_grad():
        for i, (x, _) in enumerate(batches(dataset, batch_size, resolution=resolution, shuffle=True, seed=seed)):
            if i >= n_batches:
                break
            h = student.stem(x)
            for blk in student.blocks[:block]:
                h = blk(h)
            out.append(h)
    return out


def relative_output_mismatch(qop, op, inputs: list[torch.Tensor]) -> float:
    """Ω = ‖Q(op)(x) − op(x)‖² / ‖op(x)‖² summed over the batches."""
    num = den = 0.0
    with torch.no_grad():
        for x in inputs:
            ref = op(x)
            num += float(((qop(x).to(ref.dtype) - ref) ** 2).sum())
            den += float((ref ** 2).sum())
    return num / max(den, 1e-30)


def quantization_terms(bound: BoundSpace, bank, splits, *, measure_bits: tuple | None = None, calib_batches: int = 4,
                       progress: bool = True) -> dict:
    """Mismatch and modelled drop of every (block, option); measured drops at ``measure_bits`` (default: all).

    Every float operator is swapped alone into the teacher (BatchNorm recalibrated, as phase 2
    evaluates students), its proxy accuracy taken, then the same block quantized (calibrated on
    the inputs it receives there) and evaluated again: the difference is the measured drop.
    """
    if measure_bits is None:
        measure_bits = tuple(sorted({s.bits for opts in bound.options for s in opts} - {32}))
    with torch_threads(1):
        return _quantization_terms(bound, bank, splits, measure_bits, calib_batches, progress)


def _quantization_terms(bound: BoundSpace, bank, splits, measure_bits: tuple, calib_batches: int, progress: bool) -> dict:
    space = bound.space
    tc = bound.teacher_choices()
    if tc is None:
        raise EtaError("mixed precision measures each quantized operator inside the teacher: add {family: teacher} to the pool")
    res, cfg, seed = space.data.resolution, space.solve, space.seed
    rows = [[{} for _ in opts] for opts in bound.options]
    jobs = [(b, j, s) for b, opts in enumerate(bound.options) for j, s in enumerate(opts) if s.bits != 32]
    prepared: dict = {}  # (block, float op) -> (student with it in the teacher, its proxy accuracy, the block's inputs)
    t0 = time.time()
    for b, j, spec in tqdm(jobs, desc="quantization sensitivity", disable=not progress, leave=False):
        f = spec.with_bits(32)
        if (b, f) not in prepared:  # shared by every bit-width of this operator
            choices = list(tc)
            choices[b] = bound.options[b].index(f)
            student = bank.stitch(bound.arch(choices))
            recalibrate_bn(student, splits.train, resolution=res, num_batches_=cfg.bn_batches, batch_size=space.data.batch_size, seed=seed)
            student.eval()
            prepared[(b, f)] = (student, evaluate(student, splits.proxy, resolution=res),
                                block_inputs(student, splits.train, block=b, resolution=res, n_batches=calib_batches,
                                             batch_size=space.data.batch_size, seed=seed))
        student, float_acc, inputs = prepared[(b, f)]
        op = student.blocks[b]
        qop = quantize_operator(op, spec.bits, inputs)
        row = {"op": str(spec), "bits": spec.bits, "omega": relative_output_mismatch(qop, op, inputs),
               "weight_mismatch": float(sum(mismatch(c.weight, spec.bits, "weight") for c in qop.convs.values())),
               "activation_mismatch": float(np.mean([mismatch(x, spec.bits, "activation") / max(float((x ** 2).sum()), 1e-30) for x in inputs])),
               "float_proxy_acc": float_acc}
        if spec.bits in measure_bits:
            student.blocks[b] = qop
            row["measured_drop"] = float_acc - evaluate(student, splits.proxy, resolution=res)
            student.blocks[b] = op
        rows[b][j] = row
    pairs = [(r["omega"], r["measured_drop"]) for opts in rows for r in opts if "measured_drop" in r]
    om, dr = (np.array(v, float) for v in zip(*pairs)) if pairs else (np.zeros(0), np.zeros(0))
    lam = float(max(0.0, (om @ dr) / (om @ om))) if len(om) and om @ om > 0 else 0.0
    penalty = [np.array([lam * r["omega"] if r else 0.0 for r in opts]) for opts in rows]
    for b, opts in enumerate(rows):
        for j, r in enumerate(opts):
            if r:
                r["modelled_drop"] = float(penalty[b][j])
    log.info("quantization: %d (block, operator, bits) measured in %.0f s; drop = %.3g x mismatch", len(jobs), time.time() - t0, lam)
    return {"lambda": lam, "fitted_on_bits": list(measure_bits), "rows": rows, "penalty": [p.tolist() for p in penalty],
            "seconds": time.time() - t0}


def quantize_stitched(bound: BoundSpace, student, arch, splits, *, device="cpu"):
    """A stitched student as it will be deployed at ``arch``'s bit-widths: BatchNorm re-estimated, then
    folded and quantized, calibrated on training batches (phase 2's proxy evaluation and phase 3's QAT)."""
    space = bound.space
    res, n = space.data.resolution, space.solve.bn_batches
    recalibrate_bn(student, splits.train, resolution=res, num_batches_=n, batch_size=space.data.batch_size, seed=space.seed, device=device)
    calib = [x for _, (x, _) in zip(range(n), batches(splits.train, space.data.batch_size, resolution=res, shuffle=True,
                                                         seed=space.seed + 1, device=device))]
    return quantize_student(student.eval(), arch_bits(arch), calib)


def resource_limits(bound: BoundSpace) -> list[tuple[list[np.ndarray], float]]:
    """The space's size (MB) and BOPs limits as additive per-option constraints for the solver.

    Size counts weights at each block's bit-width (4-bit weights packed two per byte, as stored);
    BOPs are multiply-accumulates × weight bits × activation bits at the base resolution. Stem and
    head are float and fixed, so they are taken off the limit (the teacher's: at narrower interface
    widths they are smaller, so the limit is conservative there).
    """
    cfg = bound.space.solve
    if cfg.max_size_mb is None and cfg.max_gbops is None:
        return []
    res = bound.space.data.resolution
    stem_head = [bound.split.stem, bound.split.head]
    fixed_params = sum(p.numel() for m in stem_head for p in m.parameters())
    stem_macs = sum(count_macs(_Wrap(bound.split.stem), bound.input_shape(res)).values())
    head_macs = sum(count_macs(_Wrap(bound.split.head), (1, *bound.shapes[-1][1])).values())
    size, bops = [], []
    for b, opts in enumerate(bound.options):
        s_row, o_row = [], []
        for spec in opts:
            if not families.get(spec.family).costs_latency:
                s_row.append(0.0), o_row.append(0.0)
                continue
            op = bound.operator(b, spec)
            params = sum(p.numel() for p in op.parameters())
            macs = sum(count_macs(_Wrap(op), (1, *bound.thinned_shapes[spec.width][b][0])).values())
            s_row.append(params * spec.bits / 8 / 1e6)
            o_row.append(macs * spec.bits * spec.bits / 1e9)
        size.append(np.array(s_row)), bops.append(np.array(o_row))
    limits = []
    if cfg.max_size_mb is not None:
        limits.append((size, cfg.max_size_mb - fixed_params * 32 / 8 / 1e6))
    if cfg.max_gbops is not None:
        limits.append((bops, cfg.max_gbops - (stem_macs + head_macs) * 32 * 32 / 1e9))
    return limits


class _Wrap(torch.nn.Module):
    """Puts a module under one top-level name so ``count_macs`` sums all of it."""

    def __init__(self, module):
        super().__init__()
        self.part = module

    def forward(self, x):
        return self.part(x)
