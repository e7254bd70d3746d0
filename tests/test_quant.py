"""eta.quant: quantizers, fake-quantized operators, the exact integer reference and TVM integer kernels."""
import numpy as np
import pytest
import torch
from timm.models._efficientnet_blocks import DepthwiseSeparableConv
from timm.models.resnet import BasicBlock as TimmBasicBlock
from timm.models.resnet import Bottleneck as TimmBottleneck
from timm.models.resnet import downsample_conv
from torch import nn

from eta.arch import OpSpec
from eta.errors import EtaError
from eta.latency.protocol import Protocol
from eta.families import build_operator
from eta.families.conv import InvertedResidual
from eta.quant import (
    CONTAINER_DTYPE,
    compile_int,
    fake_quantize_weight,
    fold_conv_bn,
    integer_reference,
    measure_int,
    mismatch,
    quantize_operator,
    round_half_away,
    to_relax,
)
from eta.quant.quantizers import dyadic_multipliers, rounding_right_shift, weight_scale

from .conftest import with_batchnorm_statistics

SHAPE = (8, 8, 8)


def _trained(op: nn.Module, in_shape, seed: int = 0) -> nn.Module:
    return with_batchnorm_statistics(op, in_shape, seed=seed, batch=16)


def _op(spec: OpSpec, out_shape=SHAPE, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _trained(build_operator(spec, SHAPE, out_shape), SHAPE, seed)


def _batches(n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, *SHAPE, generator=g) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# quantizers


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_quantization_error_is_at_most_half_a_step_and_exact_on_the_grid(bits):
    w = torch.randn(6, 4, 3, 3)
    scale = weight_scale(w, bits).view(-1, 1, 1, 1)
    error = (fake_quantize_weight(w, bits) - w).abs()
    assert bool((error <= scale / 2 + 1e-7).all())
    assert float(error.max()) > 0

    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax, qmax + 1, (6, 4, 3, 3)).float()
    codes[:, 0, 0, 0] = qmax  # every channel reaches the top level, so its scale is exactly the grid step
    step = torch.rand(6, 1, 1, 1) + 0.1
    grid = codes * step
    assert torch.allclose(fake_quantize_weight(grid, bits), grid, rtol=0, atol=1e-6)


def test_32_bits_is_the_identity():
    w = torch.randn(4, 3, 1, 1)
    assert torch.equal(fake_quantize_weight(w, 32), w)
    assert mismatch(w, 32) == 0.0


def test_integer_rounding_shift_matches_float_rounding_ties_away_from_zero():
    assert round_half_away(torch.tensor([0.5, 1.5, 2.5, -2.5, 2.49])).tolist() == [1, 2, 3, -3, 2]  # not half-to-even
    p = torch.tensor([5, -5, 6, -6, 7, -7, 10, -10, 12, -12, 0, 1023, -1025], dtype=torch.int64)
    n = torch.tensor(2, dtype=torch.int64)
    expected = round_half_away(p.double() / 4).to(torch.int64)
    assert torch.equal(rounding_right_shift(p, n), expected)
    assert expected.tolist()[:8] == [1, -1, 2, -2, 2, -2, 3, -3]  # 1.25, 1.5, 1.75, 2.5: ties leave zero
    wanted = [torch.tensor([0.0123, 3.7], dtype=torch.float64), torch.tensor([0.5, 0.001], dtype=torch.float64)]
    m0, shift = dyadic_multipliers(wanted)
    step = torch.pow(2.0, -shift.double())  # one fixed-point scale per channel, set by its larger multiplier
    for m, w in zip(m0, wanted):
        assert bool(((m.double() * step - w).abs() <= step / 2).all())
    assert torch.equal(shift, torch.tensor([30, 28]))  # 0.5 = 0.5 * 2^0 and 3.7 = 0.925 * 2^2 get 30 significant bits
    assert int(max(m.max() for m in m0)) < 2 ** 31


def test_batchnorm_folding_equals_conv_then_batchnorm_in_eval_mode():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
        bn.weight.normal_()
        bn.bias.normal_()
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        expected = bn.eval()(conv(x))
        folded = fold_conv_bn(conv, bn)(x)
    assert torch.allclose(folded, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(conv(x), expected, atol=1e-2)  # folding did something


def test_fake_quant_is_close_to_float_at_8_bits_and_further_at_4():
    op = _op(OpSpec("ir", 3, 2))
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = op(x)
        rel = {b: float((quantize_operator(op, b, _batches())(x) - expected).norm() / expected.norm()) for b in (8, 4)}
    assert 0 < rel[8] < 0.03
    assert rel[4] > 4 * rel[8]
    w = op.conv_pw.weight
    assert mismatch(w, 4) > 10 * mismatch(w, 8) > 0
    assert mismatch(expected, 4, "activation") > 10 * mismatch(expected, 8, "activation") > 0


# ---------------------------------------------------------------------------------------------
# integer pipeline

INTEGER_CASES = {
    "ir_skip": lambda: _op(OpSpec("ir", 3, 2)),
    "ir_relu6_stride2": lambda: _trained(InvertedResidual(8, 12, 24, 5, 2, act_layer=nn.ReLU6), SHAPE),
    "depthwise_separable": lambda: _op(OpSpec("ir", 3, 1)),
    "depthwise_separable_pw_act": lambda: _trained(DepthwiseSeparableConv(8, 8, pw_act=True), SHAPE),
    "fused": lambda: _op(OpSpec("fused", 3, 2)),
    "basic_downsample": lambda: _op(OpSpec("basic", 3, 1), out_shape=(16, 4, 4)),
    "bottleneck": lambda: _op(OpSpec("bottleneck", 3, 0.5)),
    "timm_basic_downsample": lambda: _trained(TimmBasicBlock(8, 16, stride=2, downsample=downsample_conv(8, 16, 1, 2)), SHAPE),
    "timm_bottleneck": lambda: _trained(TimmBottleneck(8, 2, base_width=64), SHAPE),
}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case", sorted(INTEGER_CASES))
def test_quantop_output_is_the_dequantized_integer_reference(case, bits):
    qop = quantize_operator(INTEGER_CASES[case](), bits, _batches())
    x = 1.2 * torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(3))  # some values clip
    q_in = qop.quantize_input(x)
    ref = integer_reference(qop, q_in)
    assert ref.dtype == getattr(torch, qop.output_dtype)
    assert ref.unique().numel() > 4
    with torch.no_grad():
        assert torch.equal(qop.output_codes(x), ref.double())
        assert torch.equal(qop(x), qop.dequantize_output(ref))
    lo, hi = (0, 2 ** bits - 1) if qop.output_dtype == "uint8" else (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert lo <= int(ref.min()) and int(ref.max()) <= hi


@pytest.mark.parametrize("case,bits", [("ir_skip", 8), ("basic_downsample", 8), ("ir_relu6_stride2", 4),
                                       ("timm_basic_downsample", 8)])
def test_tvm_integer_module_is_bit_exact_with_the_reference(case, bits):
    qop = quantize_operator(INTEGER_CASES[case](), bits, _batches())
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    q_in = qop.quantize_input(x)
    compiled = compile_int(qop, tuple(q_in.shape))
    out = compiled.run(q_in)
    assert compiled.container_dtype == CONTAINER_DTYPE == "int8"
    assert str(out.dtype) == qop.output_dtype
    np.testing.assert_array_equal(out, integer_reference(qop, q_in).numpy())
    text = to_relax(qop, tuple(q_in.shape)).script()
    assert 'out_dtype="int32"' in text and "right_shift" in text and "float32" not in text


def test_qat_step_reduces_a_toy_loss_through_straight_through_gradients():
    op = _op(OpSpec("ir", 3, 2))
    qop = quantize_operator(op, 4, _batches())
    g = torch.Generator().manual_seed(11)
    x = torch.randn(16, *SHAPE, generator=g)
    with torch.no_grad():
        target = op(x) + 0.3  # reachable: a shift the folded biases can learn
    optimizer = torch.optim.Adam(qop.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(qop(x), target)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in qop.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    q_in = qop.quantize_input(x)  # after training, the integer program still matches the module
    with torch.no_grad():
        assert torch.equal(qop.output_codes(x), integer_reference(qop, q_in).double())


def test_measure_int_returns_a_positive_median():
    op = _op(OpSpec("ir", 3, 2))
    m = measure_int(op, (1, *SHAPE), protocol=Protocol(warmup=1, repeat=3, retries=0, min_repeat_ms=2, max_slowdown=None), bits=8)
    assert m.median_ms > 0 and m.repeats == 3 and m.compile_s > 0


def test_unsupported_operators_fail_with_one_line():
    vit = build_operator(OpSpec("vit", heads=2, expansion=2), (4, 8), (4, 8))
    with pytest.raises(EtaError, match="operator family vit has no integer lowering"):
        quantize_operator(vit, 8, [torch.randn(2, 4, 8)])
    silu = InvertedResidual(8, 8, 16, 3, 1, act_layer=nn.SiLU)
    with pytest.raises(EtaError, match="SiLU has no integer lowering"):
        quantize_operator(silu, 8, _batches())
    with pytest.raises(EtaError, match="not supported"):
        quantize_operator(_op(OpSpec("ir", 3, 2)), 6, _batches())
    with pytest.raises(EtaError, match="float"):
        to_relax(quantize_operator(_op(OpSpec("ir", 3, 2)), 32), (1, *SHAPE))
