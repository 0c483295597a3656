"""Shared fixtures: sample images, devices to run on, and an app built from explicit settings."""

from __future__ import annotations

import io
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.config import Settings
from service.devices import use_ieee_float32
from service.main import create_app
from service.readiness import Readiness, warm_up

ROOT = Path(__file__).resolve().parent.parent
DOG = ROOT / "service" / "samples" / "dog.jpg"

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]
use_ieee_float32()  # as the app does as it starts: the core's tests on CUDA compare with float32 references too


def encoded(img: Image.Image, fmt: str, **params: object) -> bytes:
    """`img` as a file of format `fmt` (Pillow's name: "PNG", "JPEG", ...)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: its data's length, its type, the data, and the CRC of type and data."""
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


@pytest.fixture(scope="session")
def dog_bytes() -> bytes:
    return DOG.read_bytes()


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def make_client(**overrides: object) -> TestClient:
    return TestClient(create_app(Settings(warmup=False, **overrides)))  # type: ignore[arg-type]


@pytest.fixture
def held_warm_up(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Start-up warm-up (model loading included) waits until the test sets the returned event."""
    gate = threading.Event()

    def gated(readiness: Readiness, *args: Any) -> None:
        gate.wait(30)
        warm_up(readiness, *args)

    monkeypatch.setattr("service.main.warm_up", gated)
    yield gate
    gate.set()


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with make_client() as c:
        yield c
