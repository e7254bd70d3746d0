"""A mixed-precision student as one network: fake-quantized in PyTorch, integer kernels in TVM.

:func:`quantize_student` replaces each block below 32 bits by a calibrated
:class:`~eta.quant.qop.QuantOp`; stem, head and 32-bit blocks stay float. The result,
:class:`QuantStudent`, is the model QAT trains, and :func:`to_relax_network` is the same
computation as one Relax function, which :func:`compile_network_int` compiles and times.

**Boundaries.** A tensor between blocks is either float32 or integer codes (int8/uint8 held with a
per-tensor scale and zero point 0):

- float -> integer: ``clip(round_half_away(float64(x) / s_in), qmin, qmax)`` cast to the block's
  input container (exactly :meth:`ActQuant.codes`);
- integer -> float: ``float32(float64(codes) * s_out)`` (exactly what ``QuantOp.forward`` returns);
- integer -> integer: codes are requantized in integers, ``clip(round(codes * M0 >> n))`` with
  the dyadic ``M0 * 2^-n ≈ s_out / s_in`` of :func:`~eta.quant.quantizers.dyadic_multipliers`,
  never leaving int64; an identity block passes codes through unchanged.

``QuantStudent.forward`` implements the integer -> integer rule itself (it does not call
``QuantOp.forward`` block after block, which would dequantize to float32 and round again), so the
PyTorch model is what the integer module computes; only the float parts (TVM vs PyTorch float32
kernels) differ, by float rounding, which can move a value across a quantization step now and then.

**Composition.** One ``relax.BlockBuilder`` builds ``main``. Each float part (stem, head, float
block) is imported alone with ``torch.export`` + ``from_exported_program``
(:func:`eta.latency.tvm_backend.to_relax`), each integer block is built by
:func:`eta.quant.integer.to_relax`; their ``main`` functions are added as private functions, ``main``
calls them in order with the boundary ops emitted between the calls, and
``InlinePrivateFunctions`` then flattens everything into one function, so TVM fuses across block
boundaries as it would in a float network and the whole student is one VM call.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import EtaError
from ..latency import backends, tvm_backend
from ..latency.backends import register_measurer
from ..latency.protocol import Measurement, Protocol
from ..network import StemBlocksHead
from .integer import to_relax as int_block_to_relax
from .lowering import INPUT, OUTPUT, describe
from .qop import QuantOp, input_tensors, quantize_operator
from .quantizers import FLOAT_BITS, check_bits, dyadic_multipliers, requantize_int

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Eval mode for a while, then each submodule's own mode back (a QAT loop may freeze some BN)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def is_integer_block(block: nn.Module) -> bool:
    """Whether a block runs with integer kernels (a QuantOp below 32 bits)."""
    return isinstance(block, QuantOp) and not block.is_float


def boundary_multiplier(scale_from: float, scale_to: float) -> tuple[int, int]:
    """(M0, n) with ``M0 * 2^-n ≈ scale_from / scale_to``: requantizes codes between two integer blocks."""
    m0, shift = dyadic_multipliers([torch.tensor([float(scale_from) / float(scale_to)], dtype=torch.float64)])
    return int(m0[0][0]), int(shift[0])


def requantize_codes(codes: torch.Tensor, scale_from: float, q_to) -> torch.Tensor:
    """Codes at ``scale_from`` rescaled to the quantizer ``q_to`` in int64 dyadic arithmetic (STE gradient)."""
    s_to = float(q_to.scale)
    lo, hi = int(q_to.qmin), int(q_to.qmax)
    m0, shift = boundary_multiplier(scale_from, s_to)
    with torch.no_grad():
        m0_t = torch.tensor([m0], dtype=torch.int64, device=codes.device)
        shift_t = torch.tensor([shift], dtype=torch.int64, device=codes.device)
        exact = requantize_int([torch.round(codes.detach()).to(torch.int64)], [m0_t], shift_t, lo, hi).to(codes.dtype)
    approx = torch.clamp(codes * (float(scale_from) / s_to), lo, hi)
    return approx + (exact - approx).detach()


# ---------------------------------------------------------------------------------------------
# the PyTorch model


# A tensor between blocks: (float h, None, None) or (None, integer codes as float64 with STE gradients, their scale).


def _as_float(state: tuple, dtype) -> torch.Tensor:
    """The float tensor a float part receives: ``h``, or the codes dequantized as QuantOp.forward does."""
    h, codes, scale = state
    return h if codes is None else (codes * scale).to(dtype)


def _advance(block: nn.Module, state: tuple, dtype) -> tuple:
    """Run one block on a between-blocks tensor by the boundary rules of the module docstring."""
    h, codes, scale = state
    if isinstance(block, nn.Identity):
        return state  # codes or float pass through unchanged
    if is_integer_block(block):
        if codes is not None:  # integer -> integer: requantize, then hand the block exactly those codes
            h = requantize_codes(codes, scale, block.quant[INPUT]) * block.quant[INPUT].scale
        return None, block.output_codes(h), block.quant[OUTPUT].scale
    return block(_as_float(state, dtype)), None, None


class QuantStudent(StemBlocksHead):
    """A student whose blocks below 32 bits are :class:`QuantOp` s; stem and head stay float.

    ``forward(float x) -> float logits`` is the fake-quantized network, trainable (STE) and equal
    to the integer network up to the float parts' rounding. ``bits`` is one entry per block.
    QAT should keep float blocks' batch norms in eval mode: the integer module uses running statistics.
    """

    def __init__(self, stem: nn.Module, blocks: Sequence[nn.Module], head: nn.Module, bits: Sequence[int]):
        super().__init__(stem, list(blocks), head)
        if len(bits) != len(self.blocks):
            raise EtaError(f"{len(bits)} bit-widths for {len(self.blocks)} blocks")
        self.bits = [check_bits(b) for b in bits]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = (self.stem(x), None, None)
        for block in self.blocks:
            state = _advance(block, state, x.dtype)
        return self.head(_as_float(state, x.dtype))

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def quantize_student(student: nn.Module, bits: Sequence[int], calib_batches, percentile: float | None = None) -> QuantStudent:
    """A :class:`QuantStudent` of ``student`` (untouched) with block ``i`` at ``bits[i]``.

    Each block is calibrated on the inputs it receives inside the quantized network: the
    batches run through the stem and the already-quantized prefix, so scales match what the
    integer module sees. Identity blocks stay identity at any bit-width.
    """
    blocks = list(student.blocks)
    if len(bits) != len(blocks):
        raise EtaError(f"{len(bits)} bit-widths for a student of {len(blocks)} blocks")
    bits = [check_bits(b) for b in bits]
    stem, head = copy.deepcopy(student.stem).eval(), copy.deepcopy(student.head)
    new_blocks: list[nn.Module] = []
    with torch.no_grad(), _eval_mode(student):
        inputs = list(input_tensors(calib_batches))
        if not inputs:
            raise EtaError("quantizing a student needs at least one calibration batch")
        states = [(stem(x), None, None) for x in inputs]
        for i, (block, b) in enumerate(zip(blocks, bits)):
            if b == FLOAT_BITS or isinstance(block, nn.Identity):
                new = copy.deepcopy(block)
            else:
                received = [_as_float(s, x.dtype) for s, x in zip(states, inputs)]
                try:
                    new = quantize_operator(block, b, received, percentile)
                except EtaError as err:
                    raise EtaError(f"block {i}: {err}") from None
            new.eval()
            new_blocks.append(new)
            states = [_advance(new, s, x.dtype) for s, x in zip(states, inputs)]
    qstudent = QuantStudent(stem, new_blocks, head, bits)
    qstudent.train(student.training)
    log.info("quantized student at bits %s (%d integer blocks)", bits, sum(is_integer_block(b) for b in new_blocks))
    return qstudent


def quant_skeleton(student: nn.Module, bits: Sequence[int]) -> QuantStudent:
    """An uncalibrated :class:`QuantStudent` with the right module tree, to load a saved state dict into."""
    bits = [check_bits(b) for b in bits]
    blocks = []
    for block, b in zip(student.blocks, bits):
        if b == FLOAT_BITS or isinstance(block, nn.Identity):
            blocks.append(copy.deepcopy(block))
        else:
            blocks.append(QuantOp(*describe(block), b))
    return QuantStudent(copy.deepcopy(student.stem), blocks, copy.deepcopy(student.head), bits)


# ---------------------------------------------------------------------------------------------
# Relax


def _part_shapes(qstudent: QuantStudent, input_shape: tuple) -> list[tuple]:
    """Input shape of the stem, of each block and of the head."""
    shapes = [tuple(input_shape)]
    with torch.no_grad():
        h = qstudent.stem(torch.zeros(*input_shape))
        for block in qstudent.blocks:
            shapes.append(tuple(h.shape))
            h = block(h)
        shapes.append(tuple(h.shape))
    return shapes


def _first_output(bb, call):
    """Unwrap the 1-tuple that from_exported_program functions return."""
    from tvm import relax

    value = bb.emit(call)
    if isinstance(value.ty, relax.TupleType):
        value = bb.emit(relax.TupleGetItem(value, 0))
    return value


def _emit_quantize(bb, x, scale: float, lo: int, hi: int, dtype: str):
    """float32 -> codes: ``clip(round_half_away(float64(x) / scale))``, as ActQuant.codes does in torch."""
    from tvm import relax

    op = relax.op
    v = bb.emit(op.divide(op.astype(x, "float64"), relax.const(float(scale), "float64")))
    r = bb.emit(op.multiply(op.sign(v), op.floor(op.add(op.abs(v), relax.const(0.5, "float64")))))
    return bb.emit(op.astype(op.clip(r, lo, hi), dtype))


def _emit_dequantize(bb, codes, scale: float):
    """codes -> float32: ``float32(float64(codes) * scale)``, as QuantOp.forward does in torch."""
    from tvm import relax

    op = relax.op
    return bb.emit(op.astype(op.multiply(op.astype(codes, "float64"), relax.const(float(scale), "float64")), "float32"))


def _emit_requantize(bb, codes, scale_from: float, scale_to: float, lo: int, hi: int, dtype: str):
    """codes -> codes at another scale in int64: ``clip(round_half_away(codes * M0 / 2^n))``."""
    from tvm import relax

    op = relax.op
    m0, shift = boundary_multiplier(scale_from, scale_to)
    total = bb.emit(op.multiply(op.astype(codes, "int64"), relax.const(m0, "int64")))
    half = relax.const(1 << (shift - 1), "int64")
    magnitude = bb.emit(op.right_shift(op.add(op.abs(total), half), relax.const(shift, "int64")))
    rounded = bb.emit(op.where(op.less(total, relax.const(0, "int64")), op.negative(magnitude), magnitude))
    return bb.emit(op.astype(op.clip(rounded, lo, hi), dtype))


def _private(mod):
    """The ``main`` of a single-function IRModule as a private function (no global symbol) to inline."""
    return mod["main"].without_attr("global_symbol")


def to_relax_network(qstudent: QuantStudent, input_shape: tuple, inline: bool = True):
    """The whole student as one Relax IRModule ``main(x: float32[input_shape]) -> float32 logits``.

    Float parts come from ``torch.export``, integer blocks from :func:`eta.quant.integer.to_relax`,
    joined by quantize / requantize / dequantize ops (see the module docstring); ``inline`` flattens
    them into ``main`` so TVM fuses across parts.
    """
    from tvm import relax


    if not isinstance(qstudent, StemBlocksHead):
        raise EtaError(f"to_relax_network needs a network with stem, blocks and head, got {type(qstudent).__name__}")
    model = copy.deepcopy(qstudent).cpu().eval()  # export needs eval mode and CPU; the caller's model is left alone
    if not isinstance(model, QuantStudent):
        model = QuantStudent(model.stem, list(model.blocks), model.head, [FLOAT_BITS] * len(model.blocks))
    for i, block in enumerate(model.blocks):
        if is_integer_block(block) and not block.calibrated:
            raise EtaError(f"block {i} is not calibrated: quantize the student with calibration batches first")
    shapes = _part_shapes(model, input_shape)

    bb = relax.BlockBuilder()
    stem_gv = bb.add_func(_private(tvm_backend.to_relax(model.stem, shapes[0])), "stem")
    block_gvs = []
    for i, block in enumerate(model.blocks):
        if isinstance(block, nn.Identity):
            block_gvs.append(None)
        elif is_integer_block(block):
            block_gvs.append(bb.add_func(_private(int_block_to_relax(block, shapes[i + 1])), f"block{i}_int{block.bits}"))
        else:
            block_gvs.append(bb.add_func(_private(tvm_backend.to_relax(block, shapes[i + 1])), f"block{i}_float"))
    head_gv = bb.add_func(_private(tvm_backend.to_relax(model.head, shapes[-1])), "head")

    x = relax.Var("x", relax.TensorType(tuple(int(d) for d in input_shape), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = _first_output(bb, relax.Call(stem_gv, [x]))
            producer = None  # the integer block whose codes ``h`` holds, None while ``h`` is float
            for block, gv in zip(model.blocks, block_gvs):
                if gv is None:
                    continue
                if is_integer_block(block):
                    q_in = block.quant[INPUT]
                    lo, hi = int(q_in.qmin), int(q_in.qmax)
                    if producer is None:
                        h = _emit_quantize(bb, h, float(q_in.scale), lo, hi, block.input_dtype)
                    else:
                        h = _emit_requantize(bb, h, producer.output_scale, float(q_in.scale), lo, hi, block.input_dtype)
                    h = _first_output(bb, relax.Call(gv, [h]))
                    producer = block
                    continue
                if producer is not None:
                    h, producer = _emit_dequantize(bb, h, producer.output_scale), None
                h = _first_output(bb, relax.Call(gv, [h]))
            if producer is not None:
                h = _emit_dequantize(bb, h, producer.output_scale)
            out = bb.emit_output(_first_output(bb, relax.Call(head_gv, [h])))
        bb.emit_func_output(out)
    mod = bb.get()
    if inline:
        mod = relax.transform.InlinePrivateFunctions()(mod)
        mod = relax.transform.DeadCodeElimination(["main"])(mod)
    return mod


# ---------------------------------------------------------------------------------------------
# compile, run, time


class CompiledNetworkInt:
    """A :class:`QuantStudent` compiled as one TVM module for one input shape (mirrors CompiledModule)."""

    def __init__(self, qstudent: QuantStudent, input_shape: tuple, target: dict | None = None, database_dir=None):
        import tvm
        from tvm import relax

        target = target or tvm_backend.host_target()
        t0 = time.perf_counter()
        self.mod = to_relax_network(qstudent, input_shape)
        # with ``database_dir``: the schedules a tuned table timed the network with
        self.executable, self.tuned_functions = tvm_backend.build_executable(qstudent, input_shape, target, database_dir,
                                                                             relax_mod=self.mod)
        self.device = tvm_backend.device_of(target)
        self.vm = relax.VirtualMachine(self.executable, self.device)
        self.compile_s = time.perf_counter() - t0
        self.input_shape = tuple(int(d) for d in input_shape)
        self.bits = list(getattr(qstudent, "bits", []))
        self._input = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(self.input_shape).astype("float32"), self.device)
        log.debug("compiled network at bits %s for %s in %.1f s", self.bits, self.input_shape, self.compile_s)

    def _run_one(self, x: np.ndarray) -> np.ndarray:
        import tvm

        out = self.vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, dtype="float32"), self.device))
        out = out[0] if not hasattr(out, "numpy") else out
        return out.numpy()

    def run(self, x) -> np.ndarray:
        """Logits for ``x``; any batch size (run in chunks of the compiled one, the last zero-padded)."""
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        x = x.astype("float32", copy=False)
        if tuple(x.shape[1:]) != self.input_shape[1:]:
            raise EtaError(f"input of shape {tuple(x.shape)} does not match the compiled {self.input_shape}")
        n, batch = x.shape[0], self.input_shape[0]
        outs = []
        for start in range(0, n, batch):
            chunk = x[start: start + batch]
            if len(chunk) < batch:  # samples are independent (fixed scales, eval BN), so padding is harmless
                chunk = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), dtype=chunk.dtype)])
            outs.append(self._run_one(chunk))
        return np.concatenate(outs)[:n]

    def time(self, protocol: Protocol | None = None) -> Measurement:
        """Latency of one call, by the same protocol and timer as float modules."""

        return tvm_backend.time_vm(self.vm, self.device, self._input, protocol, self.compile_s)


def compile_network_int(qstudent: QuantStudent, input_shape: tuple, target: dict | None = None, database_dir=None) -> CompiledNetworkInt:
    return CompiledNetworkInt(qstudent, input_shape, target, database_dir)


def measure_network_int(model: nn.Module, input_shape: tuple, target: dict | None = None, protocol: Protocol | None = None, *,
                        bits: Sequence[int] | None = None, calib_batches=None) -> Measurement:
    """End-to-end latency of a student compiled as one integer TVM module.

    ``model`` is a :class:`QuantStudent`, or a float student with ``bits`` (one per block): it is then
    quantized, calibrated on ``calib_batches`` or one random batch (latency depends on shapes).
    """
    if not isinstance(model, QuantStudent):
        if bits is None:
            raise EtaError("measure_network_int needs bits for a float student")
        if calib_batches is None:
            calib_batches = [torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))]
        model = quantize_student(model, bits, calib_batches)
    m = CompiledNetworkInt(model, input_shape, target).time(protocol)
    log.info("network at bits %s, input %s: %.4f ms (compiled in %.1f s)", model.bits, tuple(input_shape), m.median_ms, m.compile_s)
    return m


# ---------------------------------------------------------------------------------------------
# agreement


def agreement(qstudent: QuantStudent, compiled: CompiledNetworkInt, batches) -> dict:
    """How closely the TVM module's logits follow the fake-quant PyTorch model on ``batches``.

    Returns ``max_abs_diff``, ``mean_abs_diff``, ``top1_agreement`` (fraction of equal argmax),
    ``max_abs_logit`` (the scale to judge the differences by) and ``n`` (inputs compared).
    """
    max_diff, sum_diff, count, same, n, max_logit = 0.0, 0.0, 0, 0, 0, 0.0
    device = next(qstudent.parameters()).device
    with torch.no_grad(), _eval_mode(qstudent):
        for x in input_tensors(batches):
            ref = qstudent(x.to(device)).float().cpu().numpy()
            out = compiled.run(x)
            diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
            max_diff = max(max_diff, float(diff.max()))
            sum_diff += float(diff.sum())
            count += diff.size
            same += int((out.argmax(axis=1) == ref.argmax(axis=1)).sum())
            n += len(ref)
            max_logit = max(max_logit, float(np.abs(ref).max()))
    if n == 0:
        raise EtaError("agreement needs at least one batch")
    result = {"max_abs_diff": max_diff, "mean_abs_diff": sum_diff / count, "top1_agreement": same / n,
              "max_abs_logit": max_logit, "n": n}
    log.info("integer network vs fake-quant model: %s", {k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()})
    return result


__all__ = ["CompiledNetworkInt", "QuantStudent", "agreement", "boundary_multiplier", "compile_network_int", "is_integer_block",
           "measure_network_int", "quant_skeleton", "quantize_student", "requantize_codes", "to_relax_network"]


def _measure_for_table(model: QuantStudent, input_shape: tuple, provenance: dict, database_dir=None, key=None):
    """A latency-table entry of a quantized student: one network of float and integer kernels, compiled and timed
    as the table's float networks are (tuned schedules where the table's are, the compiled-module cache)."""
    m, extra = backends.get("tvm").measure_module(model, input_shape, provenance, database_dir, key)
    return m, {**extra, "kernel_dtype": "mixed", "block_bits": list(model.bits)}


register_measurer("tvm", QuantStudent, _measure_for_table)
tvm_backend.register_relax_lowering(QuantStudent, to_relax_network)
