"""Compute devices: which are present, and resolving a client's `device` field to a `torch.device`."""

from __future__ import annotations

import re
import threading

import numpy as np
import torch

from service.errors import DeviceUnavailableError

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d{1,3})?)$")


# A GPU this process can no longer use -> why: one that failed the probe after its warm-up failed (a wheel built
# for other GPUs: "no kernel image is available"), or after a request's CUDA error (a device-side assert or an
# illegal memory access leaves its context broken for good). "auto" then means the next device, and asking for it
# by name is refused with the reason. The CPU is never taken out: it is what is left.
_out_of_service: dict[str, str] = {}


def available_devices() -> list[str]:
    """`["cpu", "cuda:0", ...]`: CPU always, then each visible CUDA device still in service."""
    return [name for name in _visible_devices() if name not in _out_of_service]


def _visible_devices() -> list[str]:
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["cpu", *cuda]


def take_out_of_service(name: str, reason: str) -> None:
    """Serve no more on the GPU `name` (`"cuda:0"`), because of `reason`; the CPU stays."""
    if name != "cpu":
        _out_of_service[name] = reason


def probe(name: str) -> None:
    """Run one tiny computation on the device and wait for it: raises if the device cannot compute."""
    torch.ones(1, device=name).add_(1).cpu()


PROBE_TIMEOUT_S = 10.0


def probe_failure(name: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the device runs the probe within `timeout_s`; else why not. The probe runs on a thread of its own
    (a daemon), so that a GPU that hangs, rather than fails, cannot hold the caller: it is left behind, once."""
    outcome: list[str | None] = []

    def run() -> None:
        try:
            probe(name)
            outcome.append(None)
        except Exception as e:  # any failure to compute: the device is no longer usable
            outcome.append(str(e))

    thread = threading.Thread(target=run, name=f"probe {name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"a one-element computation did not finish within {timeout_s:g} s"


def take_failed_devices_out_of_service() -> list[str]:
    """After a request's device error: probe each GPU still in service, take out those that fail, and return
    their names. A GPU whose probe passes had a passing error, and stays."""
    failed = []
    for name in available_devices()[1:]:
        if (why := probe_failure(name)) is not None:
            take_out_of_service(name, f"it failed after a device error ({why})")
            failed.append(name)
    return failed


def resolve_device(requested: str) -> torch.device:
    """`"auto"` (CUDA when present), `"cpu"`, `"cuda"` or `"cuda:N"` -> a present device, or DeviceUnavailableError."""
    available = available_devices()
    if not _DEVICE_RE.match(requested):
        raise DeviceUnavailableError(requested, available)
    if requested == "auto":
        return torch.device(available[1] if len(available) > 1 else "cpu")
    name = "cuda:0" if requested == "cuda" else requested
    if name not in available:
        why = _out_of_service.get(name)
        raise DeviceUnavailableError(requested, available, f"{name} was taken out of service: {why}" if why else None)
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
