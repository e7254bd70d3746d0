"""Fake-quantized block operators for calibration and quantization-aware training.

:func:`quantize_operator` turns one block operator whose class an operator family has described
(:mod:`eta.quant.lowering`: a program of convs and requantizing steps) into a :class:`QuantOp`:
batch norm folded into each conv, weights quantized per output channel, activations quantized per
tensor at the block input, at every conv's input and at the block output, ranges calibrated on the
given batches.

The forward pass is the integer pipeline itself, not a simulation of it: convolutions run on
integer-valued float64 tensors (exact below 2^53, which int32 accumulators never reach; direct
and im2col algorithms only, so exact on CPU), and each requantization takes its value from the
int64 dyadic arithmetic of :mod:`eta.quant.integer` while its gradient is the straight-through
estimate of the real-valued rescaling. Its output is thus the dequantized integer output bit for
bit; the price is float64 compute in QAT (about 2x float32 on CPU). Scales are fixed after
calibration; folded weights and biases are the trainable parameters.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EtaError
from .lowering import INPUT, OUTPUT, Step, describe
from .quantizers import (
    FLOAT_BITS,
    INT32_MAX,
    INT32_MIN,
    RangeObserver,
    activation_range,
    activation_scale,
    check_bits,
    container_dtype,
    dyadic_multipliers,
    fold_batchnorm,
    quantize_weight,
    requantize_int,
    round_half_away,
    ste_round,
)

log = logging.getLogger(__name__)

RELU6_CAP = 6.0


# ---------------------------------------------------------------------------------------------
# modules


class FoldedConv(nn.Module):
    """A conv with its batch norm folded in; weight and bias are the trainable float parameters."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module | None):
        super().__init__()
        if type(conv) is not nn.Conv2d:
            raise EtaError(f"{type(conv).__name__} has no integer lowering (plain nn.Conv2d only)")
        if tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise EtaError("only undilated convs with explicit zero padding have an integer lowering")
        weight, bias = fold_batchnorm(conv, bn)
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        self.stride = tuple(int(s) for s in conv.stride)
        self.padding = tuple(int(p) for p in conv.padding)
        self.groups = int(conv.groups)

    def float_conv(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.stride, self.padding, 1, self.groups)

    def integer_conv(self, codes: torch.Tensor, input_scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(int32-valued accumulator as float64, its per-channel scale) for integer-valued float64 ``codes``."""
        w_int, w_scale = quantize_weight(self.weight.double(), bits)
        acc_scale = input_scale * w_scale
        b_int = torch.clamp(ste_round(self.bias.double() / acc_scale), INT32_MIN, INT32_MAX)
        return F.conv2d(codes, w_int, b_int, self.stride, self.padding, 1, self.groups), acc_scale


class ActQuant(nn.Module):
    """Per-tensor activation quantizer with zero point 0: a scale and the clamp range of the codes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("qmin", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("qmax", torch.tensor(0, dtype=torch.int64))

    def configure(self, lo: float, hi: float, bits: int, signed: bool, cap: float | None = None) -> None:
        """Scale for the observed ``[lo, hi]``; ``cap`` (ReLU6) lowers the top code to ``round(cap / scale)``."""
        scale = activation_scale(lo, hi, bits, signed)
        qmin, qmax = activation_range(bits, signed)
        if cap is not None:
            qmax = min(qmax, int(round_half_away(torch.tensor(cap / scale, dtype=torch.float64))))
        self.scale.fill_(scale)
        self.qmin.fill_(qmin)
        self.qmax.fill_(qmax)

    @property
    def signed(self) -> bool:
        return int(self.qmin) < 0

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer-valued float64 codes of a float tensor (STE gradient)."""
        return torch.clamp(ste_round(x.double() / self.scale), int(self.qmin), int(self.qmax))


@dataclass
class LoweredTerm:
    """A term in integers: conv weight (int8-valued), bias (int32) and the requantization multiplier M0."""

    src: str
    multiplier: torch.Tensor  # int64 (C,), M0 of this term
    weight: torch.Tensor | None = None  # int8 (O, I/groups, kh, kw)
    bias: torch.Tensor | None = None  # int32 (O,)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    groups: int = 1


@dataclass
class LoweredStep:
    """``dst = clamp(round_half_away(sum_t v_t * M0_t >> shift), qmin, qmax)`` held in ``dtype``."""

    dst: str
    terms: list
    shift: torch.Tensor  # int64 (C,)
    qmin: int
    qmax: int
    dtype: str


class QuantOp(nn.Module):
    """A block operator at ``bits`` (4 or 8; 32 keeps it float), BN folded, calibrated.

    ``forward(float x) -> float``: the dequantized output of the integer pipeline. Integer
    execution (:mod:`eta.quant.integer`) takes ``quantize_input(x)`` (``input_dtype``, scale
    ``input_scale``) and returns codes of ``output_dtype`` at ``output_scale``.
    ``container_dtype`` is the kernel width: 4-bit values are held in 8-bit containers and run on
    8-bit kernels (no int4 kernels on x86 LLVM), so 4 bits are not faster than 8 there.
    """

    container_dtype = "int8"

    def __init__(self, family: str, convs: dict, steps: tuple[Step, ...], bits: int):
        super().__init__()
        self.family = family
        self.bits = check_bits(bits)
        self.steps = tuple(steps)
        self.convs = nn.ModuleDict({name: FoldedConv(conv, bn) for name, (conv, bn) in convs.items()})
        self.quant = nn.ModuleDict({name: ActQuant() for name in (INPUT, *(s.dst for s in self.steps))})

    @property
    def is_float(self) -> bool:
        return self.bits == FLOAT_BITS

    @property
    def calibrated(self) -> bool:
        """Whether activation ranges are set (read from the buffers, so a loaded state dict counts)."""
        return int(self.quant[OUTPUT].qmax) > 0

    # -- calibration ---------------------------------------------------------------------------

    @torch.no_grad()
    def calibrate(self, batches: Iterable, percentile: float | None = None) -> "QuantOp":
        """Set every activation scale from the float (BN-folded) block run on ``batches``."""
        if self.is_float:
            return self
        observers = {name: RangeObserver(percentile) for name in self.quant}
        for x in input_tensors(batches):
            self._float_forward(x, observers)
        if not observers[INPUT].calibrated:
            raise EtaError("quantization needs at least one calibration batch")
        acts = {s.dst: s.act for s in self.steps}
        for name, q in self.quant.items():
            lo, hi = observers[name].range()
            act = acts.get(name)
            signed = lo < 0 if act is None else act == "none"  # the block input: signed only if it was seen negative
            q.configure(lo, hi, self.bits, signed, RELU6_CAP if act == "relu6" else None)
        log.debug("calibrated %s at %d bits: %s", self.family, self.bits,
                  {n: round(float(q.scale), 6) for n, q in self.quant.items()})
        return self

    # -- forward -------------------------------------------------------------------------------

    def _float_forward(self, x: torch.Tensor, observers: dict | None = None) -> torch.Tensor:
        vals = {INPUT: x}
        if observers:
            observers[INPUT].update(x)
        for step in self.steps:
            total = sum(vals[t.src] if t.conv is None else self.convs[t.conv].float_conv(vals[t.src]) for t in step.terms)
            vals[step.dst] = _float_activation(total, step.act)
            if observers:
                observers[step.dst].update(vals[step.dst])
        return vals[self.steps[-1].dst]

    def output_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (float64 values, STE gradients) of the block output for float input ``x``."""
        if self.is_float:
            raise EtaError("a 32-bit operator has no integer codes")
        if not self.calibrated:
            raise EtaError("QuantOp is not calibrated: call calibrate(batches) first")
        vals = {INPUT: self.quant[INPUT].codes(x)}
        for step in self.steps:
            values, scales = [], []
            for term in step.terms:
                src_scale = self.quant[term.src].scale
                if term.conv is None:
                    values.append(vals[term.src])
                    scales.append(src_scale.expand(vals[term.src].shape[1]))
                else:
                    acc, acc_scale = self.convs[term.conv].integer_conv(vals[term.src], src_scale, self.bits)
                    values.append(acc)
                    scales.append(acc_scale)
            vals[step.dst] = _requantize_ste(values, scales, self.quant[step.dst])
        return vals[self.steps[-1].dst]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_float:
            return self._float_forward(x)
        return (self.output_codes(x) * self.quant[OUTPUT].scale).to(x.dtype)

    # -- integer interface ---------------------------------------------------------------------

    @property
    def input_scale(self) -> float:
        return float(self.quant[INPUT].scale)

    @property
    def output_scale(self) -> float:
        return float(self.quant[OUTPUT].scale)

    @property
    def input_dtype(self) -> str:
        return container_dtype(self.bits, self.quant[INPUT].signed)

    @property
    def output_dtype(self) -> str:
        return container_dtype(self.bits, self.quant[OUTPUT].signed)

    @torch.no_grad()
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The integer input tensor (``input_dtype``) the integer pipeline consumes."""
        return self.quant[INPUT].codes(x).to(getattr(torch, self.input_dtype))

    def dequantize_output(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes.double() * self.quant[OUTPUT].scale).float()

    @torch.no_grad()
    def lowered(self) -> list[LoweredStep]:
        """The integer program (CPU tensors): int8 weights, int32 biases, M0 and shifts, computed as ``forward`` does."""
        if self.is_float or not self.calibrated:
            raise EtaError("only a calibrated operator below 32 bits has an integer program")
        program = []
        for step in self.steps:
            out_q = self.quant[step.dst]
            terms, scales = [], []
            for term in step.terms:
                src_scale = self.quant[term.src].scale
                if term.conv is None:
                    channels = self._channels(term.src)
                    terms.append(LoweredTerm(term.src, torch.empty(0)))
                    scales.append(src_scale.expand(channels))
                    continue
                conv = self.convs[term.conv]
                w_int, w_scale = quantize_weight(conv.weight.double(), self.bits)
                acc_scale = src_scale * w_scale
                b_int = torch.clamp(round_half_away(conv.bias.double() / acc_scale), INT32_MIN, INT32_MAX)
                terms.append(LoweredTerm(term.src, torch.empty(0), w_int.to(torch.int8).cpu(), b_int.to(torch.int32).cpu(),
                                         conv.stride, conv.padding, conv.groups))
                scales.append(acc_scale)
            m0, shift = dyadic_multipliers([s / out_q.scale for s in scales])
            for t, m in zip(terms, m0):
                t.multiplier = m.cpu()
            program.append(LoweredStep(step.dst, terms, shift.cpu(), int(out_q.qmin), int(out_q.qmax),
                                       container_dtype(self.bits, out_q.signed)))
        return program

    def _channels(self, tensor: str) -> int:
        """Channel count of a named tensor: the block input's, or the out-channels of the conv that makes it."""
        if tensor == INPUT:
            for step in self.steps:
                for t in step.terms:
                    if t.src == INPUT and t.conv is not None:
                        conv = self.convs[t.conv]
                        return conv.weight.shape[1] * conv.groups
        for step in self.steps:
            if step.dst == tensor:
                for t in step.terms:
                    if t.conv is not None:
                        return self.convs[t.conv].weight.shape[0]
                return self._channels(step.terms[0].src)
        raise EtaError(f"unknown tensor '{tensor}'")

    def extra_repr(self) -> str:
        return f"family={self.family}, bits={self.bits}, container={self.container_dtype}"


def _float_activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "relu":
        return F.relu(x)
    if kind == "relu6":
        return F.relu6(x)
    return x


def _requantize_ste(values: list, scales: list, out_q: ActQuant) -> torch.Tensor:
    """Codes of ``sum_t v_t * scale_t / out_scale``: value from int64 dyadic arithmetic, gradient straight through."""
    with torch.no_grad():
        m0, shift = dyadic_multipliers([s / out_q.scale for s in scales])
        exact = requantize_int([torch.round(v.detach()).to(torch.int64) for v in values], m0, shift,
                               int(out_q.qmin), int(out_q.qmax)).to(torch.float64)
        exponent = torch.pow(2.0, -shift.to(torch.float64))
    approx = sum(v * (m.to(torch.float64) * exponent).view(1, -1, 1, 1) for v, m in zip(values, m0))
    approx = torch.clamp(approx, int(out_q.qmin), int(out_q.qmax))
    return approx + (exact - approx).detach()


def input_tensors(batches) -> Iterable[torch.Tensor]:
    """Calibration / evaluation inputs: one tensor, or an iterable of tensors or (input, ...) tuples."""
    if isinstance(batches, torch.Tensor):
        yield batches
        return
    for b in batches:
        yield b[0] if isinstance(b, (tuple, list)) else b


def quantize_operator(module: nn.Module, bits: int, calib_batches=None, percentile: float | None = None) -> QuantOp:
    """A :class:`QuantOp` of ``module`` at ``bits`` (4, 8; 32 = BN-folded float), calibrated on ``calib_batches``.

    ``module`` is left untouched (its eval-mode batch-norm statistics are folded into copies).
    ``percentile`` (e.g. 99.99) clips activation ranges instead of min/max.
    """
    bits = check_bits(bits)
    family, convs, steps = describe(module)
    qop = QuantOp(family, convs, steps, bits)
    ref = next(module.parameters(), None)
    if ref is not None:
        qop.to(ref.device)
    if bits != FLOAT_BITS:
        if calib_batches is None:
            raise EtaError(f"quantizing {family} to {bits} bits needs calibration batches")
        qop.calibrate(calib_batches, percentile)
    return qop
