"""eta.quant.network: a mixed-precision student as one TVM module with integer kernels."""
import numpy as np
import pytest
import torch
from timm.layers import ClassifierHead, ConvNormAct
from torch import nn

from eta.arch import OpSpec
from eta.data import batches, load_splits
from eta.errors import EtaError
from eta.latency.protocol import Protocol
from eta.families import build_operator
from eta.quant import QuantOp, QuantStudent, agreement, compile_network_int, measure_network_int, quant_skeleton, quantize_student
from eta.quant.network import to_relax_network
from eta.network import StemBlocksHead

from .conftest import with_batchnorm_statistics

RES = 16
SHAPE = (1, RES, RES)
# float stem -> int8 IR (skip) -> float IR (stride 2) -> 4-bit basic (downsample) -> int8 IR (skip, integer
# requantization from the 4-bit block) -> identity at "8 bits" (codes pass through) -> float head
BITS = [8, 32, 4, 8, 8]
BATCH = 50


def _student(seed: int = 0) -> StemBlocksHead:
    """A small student with realistic batch-norm statistics and affine parameters, in eval mode."""
    torch.manual_seed(seed)
    blocks = [build_operator(OpSpec("ir", 3, 2), (8, 16, 16), (8, 16, 16)),
              build_operator(OpSpec("ir", 3, 3), (8, 16, 16), (16, 8, 8)),
              build_operator(OpSpec("basic", 3, 1), (16, 8, 8), (24, 4, 4)),
              build_operator(OpSpec("ir", 3, 2), (24, 4, 4), (24, 4, 4)),
              build_operator(OpSpec("identity"), (24, 4, 4), (24, 4, 4))]
    student = StemBlocksHead(ConvNormAct(1, 8, 3), blocks, ClassifierHead(24, 10, pool_type="avg"))
    with torch.no_grad():
        student.head.fc.weight.mul_(8.0)  # logits of a few units, so top-1 is not decided by float noise
    return with_batchnorm_statistics(student, SHAPE, seed=seed, batch=32)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """QuantOps run grouped convs in float64, which torch splits into one tiny OpenMP region per group;
    on a busy 2-core machine each region waits for a descheduled thread (measured 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    splits = load_splits("digits")
    calib = [x for x, _ in batches(splits.train, 64, resolution=RES)][:3]
    test = [x for x, _ in batches(splits.test, BATCH, resolution=RES)][:5]  # 250 images
    return calib, test


@pytest.fixture(scope="module")
def mixed(digits):
    student = _student()
    qstudent = quantize_student(student, BITS, digits[0])
    return student, qstudent, compile_network_int(qstudent, (BATCH, *SHAPE))


def _convs(mod) -> list[tuple[str, str, str]]:
    """(data, weight, output) dtypes of every conv2d bound in ``main``."""
    found = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if getattr(getattr(value, "op", None), "name", "") == "relax.nn.conv2d":
                found.append((value.args[0].ty.dtype, value.args[1].ty.dtype, binding.var.ty.dtype))
    return found


def test_quantize_student_keeps_the_tree_and_replaces_only_blocks_below_32_bits(mixed):
    student, qstudent, _ = mixed
    assert isinstance(qstudent, QuantStudent) and qstudent.bits == BITS
    kinds = [type(b).__name__ for b in qstudent.blocks]
    assert kinds == ["QuantOp", "InvertedResidual", "QuantOp", "QuantOp", "Identity"]
    assert [qstudent.blocks[i].bits for i in (0, 2, 3)] == [8, 4, 8]
    assert all(qstudent.blocks[i].calibrated for i in (0, 2, 3))
    assert isinstance(student.blocks[0], nn.Module) and not isinstance(student.blocks[0], QuantOp)  # original untouched
    # a skeleton of the same bits loads the state dict and computes the same function
    skeleton = quant_skeleton(student, BITS).eval()
    skeleton.load_state_dict(qstudent.state_dict())
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(skeleton(x), qstudent(x))
        assert not torch.allclose(qstudent(x), student(x), atol=1e-3)  # quantization did something


def test_integer_network_matches_the_fake_quant_model(mixed, digits):
    student, qstudent, compiled = mixed
    result = agreement(qstudent, compiled, digits[1])
    assert result["n"] >= 200
    scale = result["max_abs_logit"]
    assert scale > 1.0
    assert result["top1_agreement"] >= 0.995
    assert result["max_abs_diff"] <= 1e-3 * scale
    assert result["mean_abs_diff"] <= 1e-5 * scale
    # the module computes the quantized network, not the float one: its gap to the float student is far wider
    x = digits[1][0]
    with torch.no_grad():
        quant_gap = float((qstudent(x) - student(x)).abs().max())
    assert quant_gap > 100 * max(result["max_abs_diff"], 1e-6)
    # any batch size runs (chunks of the compiled one)
    np.testing.assert_allclose(compiled.run(x[:7]), compiled.run(x)[:7], rtol=0, atol=0)


def test_quantized_blocks_of_the_relax_module_are_integer(mixed):
    _, qstudent, _ = mixed
    mod = to_relax_network(qstudent, (1, *SHAPE))
    assert [gv.name_hint for gv in mod.get_global_vars()] == ["main"]  # one function, one VM call
    convs = _convs(mod)
    integer = [c for c in convs if c[0] != "float32"]
    floats = [c for c in convs if c[0] == "float32"]
    n_int = sum(len(qstudent.blocks[i].convs) for i in (0, 2, 3))  # 3 + 3 (with downsample) + 3
    assert len(integer) == n_int == 9
    assert all(d in ("int8", "uint8") and w == "int8" and o == "int32" for d, w, o in integer)
    assert len(floats) == 1 + 3 and all(c == ("float32", "float32", "float32") for c in floats)  # stem + float IR
    assert "right_shift" in mod.script()


def test_all_32_bits_is_the_float_student(digits):
    student = _student(seed=1)
    qstudent = quantize_student(student, [32] * 5, digits[0])
    assert not any(isinstance(b, QuantOp) for b in qstudent.blocks)
    x = digits[1][0]
    with torch.no_grad():
        expected = student(x)
        assert torch.equal(qstudent(x), expected)
    out = compile_network_int(qstudent, (BATCH, *SHAPE)).run(x)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_qat_step_through_the_quant_student_reduces_a_distillation_loss(digits):
    teacher = _student()
    qstudent = quantize_student(teacher, [4, 32, 4, 4, 4], digits[0]).eval()  # frozen BN, as QAT of a folded net
    x = digits[0][0]
    with torch.no_grad():
        target = teacher(x)
    optimizer = torch.optim.Adam(qstudent.parameters(), lr=1e-4)  # small steps: 4-bit weights flip levels
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.mse_loss(qstudent(x), target)
        optimizer.zero_grad()
        loss.backward()
        for part in (qstudent.stem, qstudent.blocks[0], qstudent.blocks[1], qstudent.blocks[3], qstudent.head):
            assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in part.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0] and losses[1] < losses[0]


def test_measure_network_int_returns_a_positive_latency():
    protocol = Protocol(warmup=1, repeat=3, retries=0, min_repeat_ms=2, max_slowdown=None)
    m = measure_network_int(_student(), (1, *SHAPE), protocol=protocol, bits=[8, 8, 8, 8, 32])
    assert m.median_ms > 0 and m.repeats == 3 and m.compile_s > 0
    with pytest.raises(EtaError, match="bit-widths"):
        quantize_student(_student(), [8, 8], [torch.randn(2, *SHAPE)])


def test_a_teacher_of_timm_resnet_blocks_quantizes_to_an_integer_network(digits):
    """The headline's int8 baseline: the zoo ResNet teacher (timm's BasicBlock) at 8 bits in every block."""
    from eta.zoo import small_resnet

    torch.manual_seed(0)
    teacher = with_batchnorm_statistics(small_resnet(width_mult=0.5), SHAPE, seed=0, batch=32)
    with torch.no_grad():
        teacher.head.fc.weight.mul_(8.0)
    qteacher = quantize_student(teacher, [8] * len(teacher.blocks), digits[0])
    assert all(isinstance(b, QuantOp) for b in qteacher.blocks)
    compiled = compile_network_int(qteacher, (BATCH, *SHAPE))
    result = agreement(qteacher, compiled, digits[1][:2])
    assert result["top1_agreement"] >= 0.99
    assert result["max_abs_diff"] <= 1e-3 * result["max_abs_logit"]
