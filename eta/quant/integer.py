"""Integer execution of a :class:`~eta.quant.qop.QuantOp`: an exact reference and TVM Relax kernels.

Both run the program of :meth:`QuantOp.lowered`: 8-bit integer activations (4-bit values held in
the same 8-bit containers), int8 per-channel weights, int32 conv accumulation with an int32 bias,
then per step ``sum_t acc_t * M0_t`` in int64 (all terms of a residual add brought to one
fixed-point scale ``out_scale * 2^-n``), a rounding right shift by ``n`` (ties away from zero),
and a clamp to the output codes that is also the ReLU / ReLU6. Products stay below 2^61 because
accumulators are int32 and ``M0 < 2^31`` (30 significant bits), so the two-term sum cannot
overflow int64.

The TVM module takes the **quantized input tensor** (``qop.input_dtype``, scale
``qop.input_scale``) and returns the **integer output codes** (``qop.output_dtype``, scale
``qop.output_scale``): quantizing at entry and dequantizing at exit belong to the neighbouring
float layers, and leaving them out times only the integer kernels.

4 bits: TVM 0.27's LLVM backend accepts ``int4`` tensors and compiles conv2d on them, but the
runtime allocates two values per byte while the generated code addresses one byte per value, so
results are wrong (and it reads past the buffer); it was also 3-7x slower than int8. 4-bit
operators therefore run on the int8/uint8 kernels (:data:`CONTAINER_DTYPE`): on this target
fewer bits are not faster, and latency tables should say so.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..errors import EtaError
from ..latency import backends, tvm_backend
from ..latency.backends import NotExecutable, register_measurer
from ..latency.protocol import Measurement, Protocol
from .lowering import INPUT
from .qop import LoweredStep, QuantOp, quantize_operator
from .quantizers import FLOAT_BITS, INT32_MAX, INT32_MIN, check_bits, requantize_int

log = logging.getLogger(__name__)

CONTAINER_DTYPE = "int8"  # the kernels every bit-width below 32 runs on (4-bit values in 8-bit containers)


def kernel_dtype(bits: int) -> str:
    """The integer kernel width an operator at ``bits`` runs with ("float32" at 32 bits)."""
    return "float32" if check_bits(bits) == FLOAT_BITS else CONTAINER_DTYPE


# ---------------------------------------------------------------------------------------------
# exact reference in torch integers


def int_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, groups: int) -> torch.Tensor:
    """Grouped 2-D convolution in int64 arithmetic (torch has no integer conv), NCHW / OIHW."""
    x = x.to(torch.int64)
    w = weight.to(torch.int64)
    n, c, _, _ = x.shape
    out_ch, in_per_group, kh, kw = w.shape
    if c != in_per_group * groups:
        raise EtaError(f"int_conv2d: {c} input channels do not match weight {tuple(w.shape)} with {groups} groups")
    (sh, sw), (ph, pw) = stride, padding
    x = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    h_out = (x.shape[2] - kh) // sh + 1
    w_out = (x.shape[3] - kw) // sw + 1
    xg = x.view(n, groups, in_per_group, x.shape[2], x.shape[3])
    wg = w.view(groups, out_ch // groups, in_per_group, kh, kw)
    acc = torch.zeros(n, groups, out_ch // groups, h_out, w_out, dtype=torch.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xg[:, :, :, i: i + sh * (h_out - 1) + 1: sh, j: j + sw * (w_out - 1) + 1: sw]
            acc += torch.einsum("ngchw,goc->ngohw", patch, wg[:, :, :, i, j])
    acc = acc.reshape(n, out_ch, h_out, w_out)
    if bias is not None:
        acc = acc + bias.to(torch.int64).view(1, -1, 1, 1)
    return acc


def integer_reference(qop: QuantOp, q_input: torch.Tensor) -> torch.Tensor:
    """Output codes of ``qop`` for integer input codes, in integer arithmetic only (int32-checked accumulators)."""
    program = qop.lowered()
    lo, hi = int(qop.quant[INPUT].qmin), int(qop.quant[INPUT].qmax)
    if q_input.is_floating_point() or int(q_input.min()) < lo or int(q_input.max()) > hi:
        raise EtaError(f"integer input must hold integer codes in [{lo}, {hi}]")
    vals = {INPUT: q_input.cpu().to(torch.int64)}
    for step in program:
        values = []
        for term in step.terms:
            v = vals[term.src]
            if term.weight is not None:
                v = int_conv2d(v, term.weight, term.bias, term.stride, term.padding, term.groups)
                if int(v.min()) < INT32_MIN or int(v.max()) > INT32_MAX:
                    raise EtaError(f"the int32 accumulator of step '{step.dst}' overflows")
                v = v.to(torch.int32)
            values.append(v)
        codes = requantize_int(values, [t.multiplier for t in step.terms], step.shift, step.qmin, step.qmax)
        vals[step.dst] = codes.to(getattr(torch, step.dtype))
    return vals[program[-1].dst]


# ---------------------------------------------------------------------------------------------
# TVM Relax


def to_relax(qop: QuantOp, input_shape: tuple):
    """A Relax IRModule ``main(q_input: input_dtype[input_shape]) -> output codes`` built from relax ops."""
    from tvm import relax

    if qop.is_float:
        raise EtaError("a 32-bit operator is float; compile it with eta.latency.tvm_backend")
    program = qop.lowered()
    op = relax.op

    def const(array, dtype):
        return relax.const(np.ascontiguousarray(np.asarray(array, dtype=dtype)), dtype)

    def per_channel(t: torch.Tensor, dtype):
        return const(t.cpu().numpy().reshape(1, -1, 1, 1), dtype)

    bb = relax.BlockBuilder()
    x = relax.Var("q_input", relax.TensorType(tuple(int(d) for d in input_shape), qop.input_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            vals = {INPUT: x}
            for step in program:
                total = None
                for term in step.terms:
                    v = vals[term.src]
                    if term.weight is not None:
                        v = bb.emit(op.nn.conv2d(v, const(term.weight.cpu().numpy(), "int8"), strides=term.stride,
                                                 padding=term.padding, groups=term.groups, out_dtype="int32"))
                        v = bb.emit(op.add(v, per_channel(term.bias, "int32")))
                    part = bb.emit(op.multiply(op.astype(v, "int64"), per_channel(term.multiplier, "int64")))
                    total = part if total is None else bb.emit(op.add(total, part))
                shift = per_channel(step.shift, "int64")
                half = per_channel(torch.bitwise_left_shift(torch.ones_like(step.shift), step.shift - 1), "int64")
                magnitude = bb.emit(op.right_shift(op.add(op.abs(total), half), shift))
                rounded = bb.emit(op.where(op.less(total, const(0, "int64")), op.negative(magnitude), magnitude))
                vals[step.dst] = bb.emit(op.astype(op.clip(rounded, step.qmin, step.qmax), step.dtype))
            out = bb.emit_output(vals[program[-1].dst])
        bb.emit_func_output(out)
    return bb.get()


class CompiledIntModule:
    """A QuantOp compiled with TVM for one input shape; ``run`` for codes, ``time`` for latency."""

    def __init__(self, qop: QuantOp, input_shape: tuple, target: dict | None = None):
        import tvm


        target = target or tvm_backend.host_target()
        t0 = time.perf_counter()
        self.executable, self.device, self.vm = tvm_backend.load_vm(to_relax(qop, input_shape), target)
        self.compile_s = time.perf_counter() - t0
        self.input_shape = tuple(input_shape)
        self.bits = qop.bits
        self.container_dtype = CONTAINER_DTYPE
        self.input_dtype, self.output_dtype = qop.input_dtype, qop.output_dtype
        lo, hi = int(qop.quant[INPUT].qmin), int(qop.quant[INPUT].qmax)
        codes = np.random.default_rng(0).integers(lo, hi + 1, size=self.input_shape).astype(self.input_dtype)
        self._input = tvm.runtime.tensor(codes, self.device)

    def run(self, q_input) -> np.ndarray:
        import tvm

        q = q_input.cpu().numpy() if isinstance(q_input, torch.Tensor) else np.asarray(q_input)
        out = self.vm["main"](tvm.runtime.tensor(np.ascontiguousarray(q, dtype=self.input_dtype), self.device))
        return out.numpy()

    def time(self, protocol: Protocol | None = None) -> Measurement:
        """Latency by the same protocol and timer as float modules."""

        return tvm_backend.time_vm(self.vm, self.device, self._input, protocol, self.compile_s)


def compile_int(qop: QuantOp, input_shape: tuple, target: dict | None = None) -> CompiledIntModule:
    return CompiledIntModule(qop, input_shape, target)


def measure_int(op, input_shape: tuple, target: dict | None = None, protocol: Protocol | None = None, *,
                bits: int | None = None, calib_batches=None) -> Measurement:
    """Latency of an operator executed with integer kernels on ``target`` (host llvm by default).

    ``op`` is a calibrated :class:`QuantOp`, or a float operator with ``bits``: it is then
    quantized, calibrated on ``calib_batches`` or one random batch (latency depends on shapes, not
    values). ``bits=32`` times the float module with ``eta.latency.tvm_backend`` instead.
    """

    target = target or tvm_backend.host_target()
    if not isinstance(op, QuantOp):
        if bits is None:
            raise EtaError("measure_int needs bits for a float operator")
        if check_bits(bits) == FLOAT_BITS:
            return tvm_backend.measure(op, input_shape, target, protocol)
        if calib_batches is None:
            calib_batches = [torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))]
        op = quantize_operator(op, bits, calib_batches)
    elif op.is_float:
        raise EtaError("a 32-bit QuantOp is float; time the float module with eta.latency.tvm_backend")
    m = CompiledIntModule(op, input_shape, target).time(protocol)
    log.debug("%s at %d bits (%s kernels), input %s: %.4f ms", op.family, op.bits, CONTAINER_DTYPE, tuple(input_shape), m.median_ms)
    return m


__all__ = ["CONTAINER_DTYPE", "CompiledIntModule", "LoweredStep", "compile_int", "int_conv2d", "integer_reference",
           "kernel_dtype", "measure_int", "to_relax"]


def _measure_for_table(op: QuantOp, input_shape: tuple, provenance: dict, database_dir=None, key=None):
    """A latency-table entry of a quantized operator: its integer kernels compiled and timed as the table's float
    entries are (tuned schedules where the table's are, the compiled-module cache)."""
    if op.is_float:
        raise NotExecutable("a 32-bit QuantOp is float; time the float module")
    # 4-bit values run on the 8-bit kernels (TVM's llvm int4 conv2d packs two values per byte but reads one)
    m, extra = backends.get("tvm").measure_module(op, input_shape, provenance, database_dir, key)
    return m, {**extra, "kernel_dtype": kernel_dtype(op.bits)}


register_measurer("tvm", QuantOp, _measure_for_table)
tvm_backend.register_relax_lowering(QuantOp, lambda op, shape: tvm_backend.exported_relax(op, shape) if op.is_float else to_relax(op, shape))
