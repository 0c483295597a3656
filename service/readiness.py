"""Readiness: on once the models are loaded and torch has run on every device; off at shutdown."""

from __future__ import annotations

import gc
import logging
import os
import threading
from pathlib import Path
from typing import Literal

import torch

from service import pipeline
from service.classifiers import Registry
from service.devices import available_devices, probe_failure, take_out_of_service

log = logging.getLogger(__name__)


class Readiness:
    """Thread-safe start-up/shutdown state for /readyz.

    With several worker processes, any of them may answer a probe, so each is ready only once all are:
    `peers_dir` (which `python -m service` makes for its workers) holds a file per ready worker, named by its
    pid, and a worker counts the files of live processes against `workers`."""

    def __init__(self, peers_dir: Path | None = None, workers: int = 1) -> None:
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._failed = threading.Event()
        self._peers_dir = peers_dir
        self._workers = workers

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping.is_set() and self._peers_ready()

    @property
    def state(self) -> Literal["ok", "starting", "stopping", "unavailable"]:
        if self._stopping.is_set():
            return "stopping"
        if self._failed.is_set():
            return "unavailable"
        return "ok" if self._ready.is_set() and self._peers_ready() else "starting"

    def _peers_ready(self) -> bool:
        if self._peers_dir is None:
            return True
        try:
            markers = [marker.name for marker in self._peers_dir.iterdir()]
        except OSError:  # the directory went away: the server is ending
            return False
        # A killed worker's file does not count.
        return sum(1 for name in markers if name.isdigit() and _alive(int(name))) >= self._workers

    def mark_ready(self) -> None:
        self._ready.set()
        if self._peers_dir is not None:
            (self._peers_dir / str(os.getpid())).touch()

    def mark_failed(self) -> None:
        self._failed.set()

    def mark_stopping(self) -> None:
        self._stopping.set()
        if self._peers_dir is not None:
            (self._peers_dir / str(os.getpid())).unlink(missing_ok=True)

    def wait(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def warm_up(readiness: Readiness, registry: Registry, models_dir: Path) -> None:
    """Load the models, then run the default pipeline and each model once per device, so that the first
    request pays no loading cost. Without models the service is not ready: /readyz stays 503."""
    try:
        registry.load(models_dir)
    except Exception:
        log.exception("loading the models from %s failed; the service stays not ready", models_dir)
        readiness.mark_failed()
        return
    for name in available_devices():
        try:
            with torch.inference_mode():
                device = torch.device(name)
                pipeline.run_pipeline(torch.rand(1, 64, 64, device=device), pipeline.PipelineSpec(), pipeline.Limits())
                for model in registry.names():
                    for size in (1, 16):  # a lone digit, and a batch as concurrent predictions make
                        registry.get(model).probabilities_of(torch.rand(size, 1, 28, 28).numpy(), device)  # as served
        except Exception as e:
            # A failed warm-up must not keep the service down: requests will pay the cost instead. A GPU that cannot
            # compute at all would fail every request "auto" sent it; one that failed for a passing reason (out of
            # memory while another process held it) passes the probe and stays.
            if name == "cpu" or probe_failure(name) is None:
                log.exception("warm-up on %s failed; serving without it", name, extra={"device": name})
            else:
                log.exception("warm-up on %s failed; it is taken out of service", name, extra={"device": name})
                take_out_of_service(name, f"its warm-up failed ({e})")
    # The hundreds of thousands of objects made so far (torch, the app, the models) live as long as the process:
    # moved out of the collector's sight, they are no longer traversed by every full collection while serving.
    # (A request that arrived during warm-up may have some of its objects frozen too: a one-off, bounded.)
    gc.collect()
    gc.freeze()
    readiness.mark_ready()
