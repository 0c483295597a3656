"""Compute devices: which are present, and resolving a client's `device` field to a `torch.device`."""

from __future__ import annotations

import re

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
