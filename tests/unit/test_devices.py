"""Devices: resolving a client's `device` field, copying to the host, and float32 kept float32 on CUDA."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.config import Settings
from service.devices import to_host, use_ieee_float32
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
