"""Readiness: on once the models are loaded and torch has run on every device; off at shutdown."""

from __future__ import annotations

import gc
import logging
import threading
from pathlib import Path
from typing import Literal

import torch

from service import pipeline
from service.classifiers import Registry
from service.devices import available_devices

log = logging.getLogger(__name__)


class Readiness:
    """Thread-safe start-up/shutdown state for /readyz."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._failed = threading.Event()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping.is_set()

    @property
    def state(self) -> Literal["ok", "starting", "stopping", "unavailable"]:
        if self._stopping.is_set():
            return "stopping"
        if self._failed.is_set():
            return "unavailable"
        return "ok" if self._ready.is_set() else "starting"

    def mark_ready(self) -> None:
        self._ready.set()

    def mark_failed(self) -> None:
        self._failed.set()

    def mark_stopping(self) -> None:
        self._stopping.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)


def warm_up(readiness: Readiness, registry: Registry, models_dir: Path) -> None:
    """Load the models, then run the default pipeline and each model once per device, so that the first
    request pays no loading cost. Without models the service is not ready: /readyz stays 503."""
    try:
        registry.load(models_dir)
    except Exception:
        log.exception("loading the models from %s failed; the service stays not ready", models_dir)
        readiness.mark_failed()
        return
    try:
        with torch.inference_mode():
            for name in available_devices():
                device = torch.device(name)
                pipeline.run_pipeline(torch.rand(1, 64, 64, device=device), pipeline.PipelineSpec(), pipeline.Limits())
                for model in registry.names():
                    registry.get(model).probabilities(torch.rand(1, 1, 28, 28, device=device))
    except Exception:  # a failed warm-up must not keep the service down: requests will pay the cost instead
        log.exception("warm-up failed; serving without it")
    # The hundreds of thousands of objects made so far (torch, the app, the models) live as long as the process:
    # moved out of the collector's sight, they are no longer traversed by every full collection while serving.
    # (A request that arrived during warm-up may have some of its objects frozen too: a one-off, bounded.)
    gc.collect()
    gc.freeze()
    readiness.mark_ready()
