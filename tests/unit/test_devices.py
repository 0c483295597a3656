"""Devices: resolving a client's `device` field, copying to the host, and float32 kept float32 on CUDA."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service import devices, pipeline, readiness
from service.classifiers import MODELS_DIR, Registry
from service.config import Settings
from service.devices import to_host, use_ieee_float32
from service.errors import DeviceUnavailableError
from service.main import create_app
from tests.conftest import DEVICES


@pytest.fixture
def tf32_on() -> Iterator[None]:
    """torch's default for cuDNN's convolutions (TF32), and TF32 for matrix products too; restored afterwards
    (torch's switches are properties of its backend modules, which monkeypatch cannot restore)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = True
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


@pytest.mark.usefixtures("tf32_on")
def test_the_app_turns_tensorfloat32_off() -> None:
    create_app(Settings(warmup=False))
    assert torch.backends.cudnn.allow_tf32 is False  # reading it raises where the settings mix torch's two interfaces
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.conv.fp32_precision in ("ieee", "none")  # "none": float32, from the switch above
    with torch.backends.cudnn.flags(enabled=False):  # as torch.export does: it reads every switch
        pass


@pytest.mark.parametrize("device", DEVICES)
def test_a_convolution_agrees_with_float64_to_float32_rounding(device: str) -> None:
    # TF32 keeps 10 bits of mantissa: sums of 75 such products would be off by 1e-4 or more of the largest, not 1e-6
    use_ieee_float32()
    rng = np.random.default_rng(0)
    x = rng.random((1, 3, 64, 64), dtype=np.float32)
    w = rng.standard_normal((8, 3, 5, 5)).astype(np.float32)
    got = to_host(F.conv2d(torch.from_numpy(x).to(device), torch.from_numpy(w).to(device)))
    want = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double()).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.fixture
def a_gpu(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A machine whose torch sees one GPU (the probe of which fails once `broken` holds its name), with every
    device in service: the state each test starts from, restored after it."""
    broken: list[str] = []

    def probe(name: str) -> None:
        if name in broken:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(devices, "_visible_devices", lambda: ["cpu", "cuda:0"])
    monkeypatch.setattr(devices, "_out_of_service", {})
    monkeypatch.setattr(devices, "probe", probe)
    return broken


def test_a_gpu_that_fails_its_probe_is_taken_out_and_auto_falls_back_to_the_cpu(a_gpu: list[str]) -> None:
    assert devices.resolve_device("auto") == torch.device("cuda:0")
    assert devices.take_failed_devices_out_of_service() == []  # a passing error: the GPU stays
    assert devices.available_devices() == ["cpu", "cuda:0"]
    a_gpu.append("cuda:0")
    assert devices.take_failed_devices_out_of_service() == ["cuda:0"]
    assert devices.available_devices() == ["cpu"]
    assert devices.resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(DeviceUnavailableError) as e:
            devices.resolve_device(name)
        assert e.value.available == ("cpu",)
        assert "cuda:0 was taken out of service: it failed after a device error (CUDA error: an illegal" in str(e.value)
    assert devices.take_failed_devices_out_of_service() == []  # probed no more
    devices.take_out_of_service("cpu", "never")
    assert devices.available_devices() == ["cpu"]  # the CPU is what is left: never taken out


@pytest.mark.parametrize(
    ("error", "probe_fails"),
    [
        (torch.AcceleratorError("CUDA error: no kernel image is available for execution on the device"), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB"), False),  # another process held it
    ],
    ids=["a torch built for other GPUs", "a passing out of memory"],
)
def test_a_gpu_whose_warm_up_fails_and_that_cannot_compute_is_taken_out(
    a_gpu: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    probe_fails: bool,
) -> None:
    run = pipeline.run_pipeline

    def cpu_only(image: torch.Tensor, *args: Any) -> Any:
        if image.device.type != "cpu":
            raise error
        return run(image, *args)

    monkeypatch.setattr(pipeline, "run_pipeline", cpu_only)
    if probe_fails:
        a_gpu.append("cuda:0")
    ready, registry = readiness.Readiness(), Registry()
    with caplog.at_level(logging.ERROR, logger="service.readiness"):
        readiness.warm_up(ready, registry, MODELS_DIR)
    assert ready.ready and registry.loaded  # on the CPU, whatever became of the GPU
    assert devices.available_devices() == (["cpu"] if probe_fails else ["cpu", "cuda:0"])
    outcome = "it is taken out of service" if probe_fails else "serving without it"
    assert [r.getMessage() for r in caplog.records] == [f"warm-up on cuda:0 failed; {outcome}"]
    if probe_fails:
        with pytest.raises(DeviceUnavailableError, match=r"cuda:0 was taken out of service: its warm-up failed \("):
            devices.resolve_device("cuda")


def test_a_gpu_that_hangs_fails_its_probe_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    held = threading.Event()
    monkeypatch.setattr(devices, "probe", lambda name: held.wait(30))  # a kernel that never ends
    try:
        assert devices.probe_failure("cuda:0", timeout_s=0.05) == (
            "a one-element computation did not finish within 0.05 s"
        )
    finally:
        held.set()
    monkeypatch.setattr(devices, "probe", lambda name: None)
    assert devices.probe_failure("cuda:0") is None
