"""Compute devices: which are present, and resolving a client's `device` field to a `torch.device`."""

from __future__ import annotations

import re

import numpy as np
import torch

from service.errors import DeviceUnavailableError

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d{1,3})?)$")


def available_devices() -> list[str]:
    """`["cpu", "cuda:0", ...]`: CPU always, then each visible CUDA device."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["cpu", *cuda]


def resolve_device(requested: str) -> torch.device:
    """`"auto"` (CUDA when present), `"cpu"`, `"cuda"` or `"cuda:N"` -> a present device, or DeviceUnavailableError."""
    available = available_devices()
    if not _DEVICE_RE.match(requested):
        raise DeviceUnavailableError(requested, available)
    if requested == "auto":
        return torch.device(available[1] if len(available) > 1 else "cpu")
    name = "cuda:0" if requested == "cuda" else requested
    if name not in available:
        raise DeviceUnavailableError(requested, available)
    return torch.device(name)


def use_ieee_float32() -> None:
    """Make CUDA compute float32 convolutions and matrix products in float32, not TensorFloat-32: torch's default
    lets cuDNN's convolutions round their operands to TF32's 10 mantissa bits (float32 has 23) on Ampere and later
    GPUs, about 5e-4 of each value, so maps and predictions on CUDA would differ from the CPU's from the fourth
    digit, where they should agree to float32 rounding. Process-wide, as torch's switches are; the CPU is unaffected.

    Through the `allow_tf32` switches, which torch reads itself (`torch.backends.cudnn.flags`, used by
    `torch.export`): setting the newer `fp32_precision` of cuDNN's convolutions alone makes that reading raise, as a
    mix of the two interfaces.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values as a host array. From a GPU the bytes come through pinned (page-locked) memory, which
    the DMA engine copies straight into, instead of pageable memory staged through a driver buffer; torch's
    caching host allocator reuses the pinned blocks, so only the first copy of a size pays for pinning."""
    if tensor.device.type != "cuda":
        return tensor.cpu().numpy()
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    pinned.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()  # the copy is done before numpy reads the bytes
    return pinned.numpy()
