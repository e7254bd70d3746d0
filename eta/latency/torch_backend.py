"""Time PyTorch modules as they run in PyTorch (eager, or ``torch.compile`` when asked)."""
from __future__ import annotations

import time

import torch

from ..errors import EtaError
from .host import cpu_name
from .protocol import Measurement, Protocol, measure_callable


def device_name(device: str = "cpu") -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return cpu_name()


@torch.inference_mode()
def measure(module, input_shape, device="cpu", protocol: Protocol | None = None, compile: bool = False) -> Measurement:
    """Latency of the module as PyTorch runs it on ``device``; ``compile_s`` includes ``torch.compile`` when asked.

    A reference beside TVM's numbers, and the backend for targets TVM does not reach.
    """
    protocol = protocol or Protocol()
    t0 = time.perf_counter()
    model = module.eval().to(device)
    if compile:
        model = torch.compile(model)
    x = torch.randn(*input_shape, device=device)
    cuda = str(device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def one_run():
        model(x)
        sync()

    try:
        one_run()  # torch.compile compiles here, on the first call
    except Exception as err:  # inductor raises many types (no C++ compiler, unsupported operator, ...)
        if not compile:
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise EtaError(f"torch.compile failed for {type(module).__name__}: {reason} (measure with compile=False)") from None
    compile_s = time.perf_counter() - t0

    def timer(number, repeat):
        out = []
        for _ in range(repeat):
            sync()
            t = time.perf_counter()
            for _ in range(number):
                model(x)
            sync()
            out.append((time.perf_counter() - t) * 1e3 / number)
        return out

    m = measure_callable(timer, one_run, protocol, device=str(device))
    m.compile_s = compile_s
    return m
