"""Request ids, one JSON log line per request, and Prometheus metrics per route and status."""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission import Admission
from service.errors import REFUSAL_REASONS

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
access_log = logging.getLogger("service.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the request id, extras, and any traceback."""

    _second: tuple[int, str] = (-1, "")  # the last whole second formatted: one access line per request reuses it

    def _time(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if self._second[0] != second:
            self._second = (second, self.formatTime(record, "%Y-%m-%dT%H:%M:%S"))
        return f"{self._second[1]}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            entry["request_id"] = rid
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and k != "request_id"})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(entry, default=str).decode()
        except (orjson.JSONEncodeError, TypeError):  # what orjson will not take (an int beyond 64 bits, say)
            return json.dumps(entry, default=str)


JSONFormatter.converter = time.gmtime


def service_log_formatter() -> JSONFormatter:
    """The formatter of `logging.json`, the service's own log configuration. Its lines never show where a call came
    from, or its thread and process, so logging is told not to find them out for every record (the logging HOWTO's
    "Optimization"; process-wide, as logging's switches are): an access line took 12.6 µs against 16-23."""
    logging._srcfile = None  # the documented switch for finding the caller's frame
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    return JSONFormatter()


class Metrics:
    """The app's own registry (not the global one), so several apps in one process do not collide.

    With several worker processes (`PROMETHEUS_MULTIPROC_DIR` set, as `python -m service` does for them) every
    worker writes its values to files there, and whichever worker answers /metrics reports all of them: counts
    and histograms summed, gauges summed over the workers that are still running. A worker that stops marks
    itself dead; one killed outright (SIGKILL, the kernel's out-of-memory killer) cannot, so each worker, as it
    starts, takes the gauges of workers that no longer exist out of the sums: uvicorn starts a new worker for
    each that dies, so a killed worker's last in-flight and compute counts leave /metrics with its successor."""

    def __init__(self, admission: Admission) -> None:
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.multiprocess = bool(path)
        if path:
            forget_dead_workers(Path(path))
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "featuremap_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "featuremap_request_duration_seconds",
            "Time from the request's arrival to the end of its response",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        gauge = functools.partial(Gauge, registry=self.registry, multiprocess_mode="livesum")
        self.in_flight = gauge("featuremap_requests_in_flight", "Requests being answered")
        self.requests_in_flight = 0  # this worker's, as a plain int for the loop to read (see `service.batching`)
        queue = gauge("featuremap_compute_queue_depth", "Requests waiting for a compute slot")
        active = gauge("featuremap_compute_active", "Requests holding a compute slot")
        if self.multiprocess:  # other workers cannot call this one's functions: each writes its counts as they change

            def sync() -> None:
                queue.set(admission.waiting)
                active.set(admission.active)

            admission.on_change = sync
            sync()
        else:
            queue.set_function(lambda: admission.waiting)
            active.set_function(lambda: admission.active)
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self.refusals = Counter(
            "featuremap_refused",
            "Requests refused with 503 to protect the server, by the bound that refused them",
            ["reason"],
            registry=self.registry,
        )
        for reason in REFUSAL_REASONS:  # every series from the start, at 0: rate() needs no first refusal
            self.refusals.labels(reason)

    def worker_stopped(self) -> None:
        """In multiprocess mode, this worker's gauges leave the sums (its counts stay: they happened)."""
        if self.multiprocess:
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]  # prometheus_client leaves it untyped

    def exposition(self) -> bytes:
        """The Prometheus text: this process's registry, or every worker's values in multiprocess mode."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # prometheus_client leaves it untyped
        return generate_latest(registry)

    def refused(self, reason: str) -> None:
        """Count one request refused by the bound `reason` (one of `REFUSAL_REASONS`)."""
        self.refusals.labels(reason).inc()

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request; each (method, route, status)'s children are looked up once."""
        key = (method, route, status)
        series = self._series.get(key)
        if series is None:
            series = (self.requests.labels(method, route, str(status)), self.latency.labels(method, route))
            self._series[key] = series
        series[0].inc()
        series[1].observe(seconds)


def forget_dead_workers(directory: Path) -> None:
    """Remove the live gauges (prometheus_client's `gauge_live*_{pid}.db` files) of processes that no longer
    exist, as `mark_process_dead` would have, had they stopped cleanly. Counts and histograms stay: they
    happened. A pid that exists is kept, whoever's it is (a reused pid's stale gauges stay, as before)."""
    for file in directory.glob("gauge_live*_*.db"):
        pid = file.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _process_exists(int(pid)):
            mark_process_dead(int(pid), str(directory))  # type: ignore[no-untyped-call]  # untyped upstream


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists and may be signalled
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


# Methods outside this set are counted as OTHER: a client cannot add label values (series) to /metrics at will.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class RequestContextMiddleware:
    """Gives every request an id (the client's `X-Request-ID` if sane, else a new one), returns it as a header,
    logs one JSON line when the response ends, and counts the request in the metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = _header(scope, b"x-request-id")
        rid = sent if sent and _SANE_ID.match(sent) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        self.metrics.in_flight.inc()
        self.metrics.requests_in_flight += 1
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.requests_in_flight -= 1
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.observe(method if method in _METHODS else "OTHER", route, status, seconds)
            access_log.info(
                "%s %s %s",
                method,
                scope["path"],
                status,
                extra={
                    "request_id": rid,
                    "method": method,
                    "route": route,
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "client": (scope.get("client") or ("", 0))[0],
                },
            )
            request_id_var.reset(token)
