"""Quantizers shared by fake-quantized training (``qop``) and integer execution (``integer``).

Conventions (HAWQ-V3 style, one per quantity so the float and integer paths cannot drift apart):

- **Rounding** is round-half-away-from-zero everywhere (:func:`round_half_away` in float,
  :func:`rounding_right_shift` in integers). It is the rounding a fixed-point requantizer gets
  from ``(|p| + 2^(n-1)) >> n`` with the sign put back, so the simulated path needs no special
  tie rule to equal the integer one.
- **Weights**: symmetric, per output channel, levels ``±(2^(b-1)-1)``, scale ``max|w| / qmax`` of
  the channel. Batch norm is folded into the conv first (:func:`fold_batchnorm`), so the folded
  weight is what gets quantized.
- **Activations**: per tensor with zero point 0. After ReLU/ReLU6 (or any tensor calibrated
  non-negative) unsigned ``[0, 2^b-1]``; otherwise *symmetric* signed ``±(2^(b-1)-1)``. Zero point
  0 keeps the integer conv free of zero-point correction terms and keeps zero padding exact; the
  price is one unused level and a wasted half range for skewed signed tensors.
- **Requantization** by a dyadic multiplier ``M0 * 2^-n`` (:func:`dyadic_multipliers`): ``M0`` has
  30 significant bits so it fits int32 and ``acc * M0`` (acc within int32) stays below 2^61,
  which lets two such terms be summed in int64 without overflow.

``bits == 32`` means float: every quantizer is then the identity. Supported widths: 8, 4, 32.
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import EtaError

log = logging.getLogger(__name__)

SUPPORTED_BITS = (4, 8, 32)
FLOAT_BITS = 32
MULTIPLIER_BITS = 30  # significant bits of the dyadic multiplier M0 (fits int32 with room to spare)
MAX_SHIFT = 62
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
EPS = 1e-12  # smallest scale: an all-zero channel or tensor still gets a finite, valid scale


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise EtaError(f"bit-width {bits} is not supported (use one of {', '.join(map(str, SUPPORTED_BITS))})")
    return int(bits)


# ---------------------------------------------------------------------------------------------
# rounding


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (torch.round would go to even)."""
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """:func:`round_half_away` in the forward pass, identity gradient (straight-through estimator)."""
    return x + (round_half_away(x) - x).detach()


def rounding_right_shift(p: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``round_half_away(p / 2^shift)`` for int64 ``p`` and shifts >= 1, in integer arithmetic only."""
    shift = torch.as_tensor(shift, dtype=torch.int64, device=p.device)
    half = torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)
    magnitude = torch.bitwise_right_shift(torch.abs(p) + half, shift)
    return torch.where(p < 0, -magnitude, magnitude)


# ---------------------------------------------------------------------------------------------
# integer ranges


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def activation_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer levels of an activation: symmetric signed ``±(2^(b-1)-1)`` or unsigned ``[0, 2^b-1]``."""
    if signed:
        return -weight_qmax(bits), weight_qmax(bits)
    return 0, 2 ** bits - 1


def container_dtype(bits: int, signed: bool) -> str:
    """The 8-bit integer type that holds a b-bit tensor (4-bit values live in 8-bit containers)."""
    if bits > 8:
        raise EtaError(f"{bits}-bit tensors have no integer container")
    return "int8" if signed else "uint8"


# ---------------------------------------------------------------------------------------------
# fake quantization


def fake_quantize(x: torch.Tensor, scale, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / scale)) * scale`` with straight-through gradients (zero outside the clamp)."""
    return torch.clamp(ste_round(x / scale), qmin, qmax) * scale


def weight_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel scale ``max|w| / qmax`` (detached: QAT moves weights, not the scale rule)."""
    amax = weight.detach().abs().flatten(1).amax(dim=1)
    return torch.clamp(amax, min=EPS) / weight_qmax(bits)


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer-valued weight with STE gradient, per-channel scale); the weight keeps its float dtype."""
    scale = weight_scale(weight, bits)
    view = scale.view(-1, *([1] * (weight.dim() - 1)))
    q = torch.clamp(ste_round(weight / view), -weight_qmax(bits), weight_qmax(bits))
    return q, scale


def fake_quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-channel symmetric fake quantization; identity at 32 bits."""
    if check_bits(bits) == FLOAT_BITS:
        return weight
    q, scale = quantize_weight(weight, bits)
    return q * scale.view(-1, *([1] * (weight.dim() - 1)))


def activation_scale(lo: float, hi: float, bits: int, signed: bool) -> float:
    """Per-tensor scale covering ``[lo, hi]`` with zero point 0."""
    amax = max(abs(float(lo)), abs(float(hi))) if signed else max(float(hi), 0.0)
    return max(amax, EPS) / activation_range(bits, signed)[1]


def fake_quantize_activation(x: torch.Tensor, bits: int, signed: bool | None = None, scale: float | None = None) -> torch.Tensor:
    """Per-tensor fake quantization of ``x``; range and signedness from ``x`` itself unless given."""
    if check_bits(bits) == FLOAT_BITS:
        return x
    lo, hi = float(x.detach().min()), float(x.detach().max())
    signed = lo < 0 if signed is None else signed
    scale = activation_scale(lo, hi, bits, signed) if scale is None else scale
    return fake_quantize(x, scale, *activation_range(bits, signed))


def mismatch(x: torch.Tensor, bits: int, kind: str = "weight") -> float:
    """``||Q_b(x) - x||^2``: the quantization perturbation whose size models the accuracy drop (HAWQ-V2).

    ``kind="weight"``: per-output-channel symmetric (dim 0 is the channel); ``"activation"``: per
    tensor, unsigned when ``x`` has no negative value. 0 at 32 bits.
    """
    if check_bits(bits) == FLOAT_BITS:
        return 0.0
    with torch.no_grad():
        if kind == "weight":
            q = fake_quantize_weight(x, bits)
        elif kind == "activation":
            q = fake_quantize_activation(x, bits)
        else:
            raise EtaError(f"mismatch kind must be 'weight' or 'activation', got '{kind}'")
        return float(torch.sum((q - x) ** 2))


# ---------------------------------------------------------------------------------------------
# calibration


class RangeObserver:
    """Range of a tensor over calibration batches: global min/max, or the mean per-batch percentile.

    ``percentile`` (e.g. 99.99) clips rare outliers that would otherwise stretch the scale; each
    batch contributes its ``percentile`` and ``100 - percentile`` quantiles (on at most
    ``max_samples`` values drawn without replacement) and the batches are averaged.
    """

    def __init__(self, percentile: float | None = None, max_samples: int = 1_000_000, seed: int = 0):
        if percentile is not None and not 50.0 < percentile <= 100.0:
            raise EtaError(f"observer percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self.max_samples = max_samples
        self._generator = torch.Generator().manual_seed(seed)
        self._lo: list[float] = []
        self._hi: list[float] = []

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().flatten().double().cpu()
        if x.numel() == 0:
            return
        if self.percentile is None:
            self._lo.append(float(x.min()))
            self._hi.append(float(x.max()))
            return
        if x.numel() > self.max_samples:
            x = x[torch.randperm(x.numel(), generator=self._generator)[: self.max_samples]]
        q = torch.quantile(x, torch.tensor([1 - self.percentile / 100, self.percentile / 100], dtype=x.dtype))
        self._lo.append(float(q[0]))
        self._hi.append(float(q[1]))

    @property
    def calibrated(self) -> bool:
        return bool(self._lo)

    def range(self) -> tuple[float, float]:
        if not self._lo:
            raise EtaError("activation observer saw no calibration data")
        if self.percentile is None:
            return min(self._lo), max(self._hi)
        return sum(self._lo) / len(self._lo), sum(self._hi) / len(self._hi)


# ---------------------------------------------------------------------------------------------
# batch-norm folding


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one conv equal to ``bn(conv(x))`` in eval mode (running statistics).

    ``w' = w * gamma / sigma``, ``b' = beta + (b - mu) * gamma / sigma`` with ``sigma = sqrt(var + eps)``;
    done before weight quantization so the per-channel scales see the weights that actually run.
    """
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    if bn is None:
        return weight.float(), bias.float()
    if bn.running_mean is None or bn.running_var is None:
        raise EtaError(f"cannot fold {type(bn).__name__} without running statistics (track_running_stats=False)")
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(bias)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(bias)
    factor = gamma / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    folded_w = weight * factor.view(-1, 1, 1, 1)
    folded_b = beta + (bias - bn.running_mean.detach().double()) * factor
    return folded_w.to(conv.weight.dtype), folded_b.to(conv.weight.dtype)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> nn.Conv2d:
    """A new conv (with bias) computing ``bn(conv(x))`` of eval mode; the originals are untouched."""
    weight, bias = fold_batchnorm(conv, bn)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    with torch.no_grad():
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
    return folded


# ---------------------------------------------------------------------------------------------
# dyadic requantization


def dyadic_multipliers(multipliers: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Integer ``M0`` per multiplier and one shared shift ``n`` per channel with ``M0 * 2^-n ≈ multiplier``.

    Terms that are summed before one rounding (a conv and its residual) share the shift, so their
    sum is formed in one fixed-point scale. The largest multiplier of a channel gets 30
    significant bits; the others as many as that shift allows.
    """
    ms = [torch.as_tensor(m, dtype=torch.float64) for m in multipliers]
    if any(bool((m < 0).any()) for m in ms):
        raise EtaError("requantization multipliers must be non-negative")
    largest = torch.stack(ms).amax(dim=0)
    _, exponent = torch.frexp(largest)  # largest = f * 2^exponent, f in [0.5, 1)
    shift = (MULTIPLIER_BITS - exponent.to(torch.int64)).clamp(max=MAX_SHIFT)
    if bool((shift < 1).any()):
        raise EtaError(f"requantization multiplier {float(largest.max()):.3g} is too large for a right shift")
    factor = torch.pow(2.0, shift.to(torch.float64))
    m0 = [round_half_away(m * factor).to(torch.int64) for m in ms]
    return m0, shift


def requantize_int(terms: Iterable[torch.Tensor], m0: Sequence[torch.Tensor], shift: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``clamp(round(sum_t v_t * M0_t * 2^-n), lo, hi)`` in int64; M0 and n per channel (dim 1)."""
    total = None
    for value, mult in zip(terms, m0):
        part = value.to(torch.int64) * mult.view(1, -1, *([1] * (value.dim() - 2)))
        total = part if total is None else total + part
    return torch.clamp(rounding_right_shift(total, shift.view(1, -1, *([1] * (total.dim() - 2)))), lo, hi)
