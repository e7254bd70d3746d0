"""Which device a task computes on, and mixed precision there.

Nothing in eta names a device itself: a phase asks :func:`pick_device` with the GPUs its task was
given (Ray sets ``CUDA_VISIBLE_DEVICES``, so the task's first visible GPU is its own), and wraps its
forward passes in :func:`autocast`. AMP is bf16 on GPUs that support it, else fp16 with a gradient
scaler; it is off on CPUs, where float32 is what the latency tables and the exactness checks assume.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import EtaError

AMP_MODES = ("auto", "bf16", "fp16", "off")


def pick_device(num_gpus: float = 0) -> torch.device:
    """``cuda`` when the task was given GPUs (a fraction counts) and one is visible, else ``cpu``."""
    if num_gpus and num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def amp_dtype(device, amp: str | None = "auto") -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None: full precision)."""
    amp = "off" if amp is None else str(amp)
    if amp not in AMP_MODES:
        raise EtaError(f"amp must be one of {', '.join(AMP_MODES)}; got {amp}")
    device = torch.device(device)
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device, amp: str | None = "auto"):
    """A context running its forward passes in the AMP dtype of ``device`` (a no-op without AMP)."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(device, amp: str | None = "auto") -> torch.amp.GradScaler | None:
    """A gradient scaler where AMP is fp16 on a GPU (bf16 and float32 need none)."""
    if amp_dtype(device, amp) is torch.float16 and is_cuda(device):
        return torch.amp.GradScaler(torch.device(device).type)
    return None


def optimizer_step(loss, optimizer, scaler=None) -> None:
    """Backward and one optimiser step, through the gradient scaler when fp16 AMP needs one."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
