"""Mixed-precision quantization of candidate operators, executed with integer kernels.

Each block operator can run at its own bit-width (4, 8, or 32 = float): :func:`quantize_operator`
folds batch norm, quantizes weights per channel and activations per tensor and calibrates the
ranges (the result trains with straight-through gradients); :mod:`eta.quant.integer` runs the
same integer program exactly in torch and as TVM Relax integer kernels, and times it, so the
latency a search sees for a bit-width is the latency of real integer code. ``vit`` blocks stay
float.
"""
from .integer import CONTAINER_DTYPE, CompiledIntModule, compile_int, integer_reference, kernel_dtype, measure_int, to_relax
from .network import (
    CompiledNetworkInt,
    QuantStudent,
    agreement,
    compile_network_int,
    measure_network_int,
    quant_skeleton,
    quantize_student,
    to_relax_network,
)
from .lowering import describe, lowerable, register_lowering
from .qop import QuantOp, quantize_operator
from .quantizers import (
    SUPPORTED_BITS,
    RangeObserver,
    fake_quantize,
    fake_quantize_activation,
    fake_quantize_weight,
    fold_batchnorm,
    fold_conv_bn,
    mismatch,
    round_half_away,
    ste_round,
)

__all__ = [
    "CONTAINER_DTYPE", "CompiledIntModule", "CompiledNetworkInt", "QuantOp", "QuantStudent", "RangeObserver", "SUPPORTED_BITS",
    "agreement", "compile_int", "compile_network_int", "describe", "lowerable", "register_lowering", "measure_network_int", "quant_skeleton", "quantize_student",
    "to_relax_network",
    "fake_quantize", "fake_quantize_activation", "fake_quantize_weight", "fold_batchnorm", "fold_conv_bn",
    "integer_reference", "kernel_dtype", "measure_int", "mismatch", "quantize_operator", "round_half_away", "ste_round",
    "to_relax",
]
