"""Readiness: a flag that turns on once torch has run a small pipeline on every device, and off at shutdown."""

from __future__ import annotations

import logging
import threading
from typing import Literal

import torch

from service import pipeline
from service.devices import available_devices

log = logging.getLogger(__name__)


class Readiness:
    """Thread-safe start-up/shutdown state for /readyz."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._stopping = threading.Event()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping.is_set()

    @property
    def state(self) -> Literal["ok", "starting", "stopping"]:
        if self._stopping.is_set():
            return "stopping"
        return "ok" if self._ready.is_set() else "starting"

    def mark_ready(self) -> None:
        self._ready.set()

    def mark_stopping(self) -> None:
        self._stopping.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)


def warm_up(readiness: Readiness) -> None:
    """Run the default pipeline once per device so the first request pays no kernel-loading cost."""
    try:
        with torch.inference_mode():
            for name in available_devices():
                image = torch.rand(1, 64, 64, device=name)
                pipeline.run_pipeline(image, pipeline.PipelineSpec(), pipeline.Limits())
    except Exception:  # a failed warm-up must not keep the service down: requests will pay the cost instead
        log.exception("warm-up failed; serving without it")
    readiness.mark_ready()
