"""Robustness through TestClient: request ids, logs, metrics, 500s without internals, out-of-memory, compute
deadlines, admission control, API keys and CORS."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import logging.config
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from starlette.requests import Request

from service import devices, pipeline
from service.__main__ import LOG_CONFIG
from service.admission import Admission
from service.api.deps import require_api_key
from service.config import Settings
from service.errors import OverloadedError, UnauthorizedError
from service.main import create_app
from service.observability import JSONFormatter
from tests.api.test_errors import assert_problem, refusals
from tests.conftest import DOG, make_client

URL = "/v1/featuremaps"
FILES = {"image": ("dog.jpg", DOG.read_bytes(), "image/jpeg")}
SMALL = {"spec": json.dumps({"output": {"stages": [2], "format": "json"}})}


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [(None, False), ("abc-123_X.y:z", True), ("has spaces", False), ("x" * 129, False), ("ünïcode".encode(), False)],
)
def test_every_response_carries_a_request_id(client: TestClient, sent: str | bytes | None, echoed: bool) -> None:
    headers = {"X-Request-ID": sent} if sent else {}
    for r in (client.get("/healthz", headers=headers), client.get("/nope", headers=headers)):
        rid = r.headers["x-request-id"]
        assert rid == sent if echoed else re.fullmatch(r"[0-9a-f]{32}", rid)


def test_one_json_log_line_per_request(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="service.access"):
        r = client.post(URL, files=FILES, data=SMALL, headers={"X-Request-ID": "trace-1"})
    records = [rec for rec in caplog.records if rec.name == "service.access"]
    assert len(records) == 1
    line = json.loads(JSONFormatter().format(records[0]))
    assert line["request_id"] == "trace-1" == r.headers["x-request-id"]
    assert line["route"] == URL and line["status"] == 200 and line["method"] == "POST"
    assert line["duration_ms"] > 0 and line["level"] == "info" and line["time"].endswith("Z")


def test_log_lines_are_json_whatever_the_extras_hold() -> None:
    """orjson writes the lines; what it cannot take (an int beyond 64 bits, a non-str key) still makes JSON."""
    formatter = JSONFormatter()
    for extra in ({"n": 2**70}, {"d": {1: "x"}}, {"obj": object()}, {"f": 1.5, "s": "é\n"}):
        record = logging.LogRecord("service", logging.INFO, __file__, 1, "hello %s", ("you",), None)
        record.__dict__.update(extra)
        line = json.loads(formatter.format(record))
        assert line["message"] == "hello you" and line["level"] == "info"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
        assert set(extra) <= set(line)
    assert json.loads(formatter.format(record))["s"] == "é\n"


def test_the_service_log_config_skips_what_its_lines_never_show(monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m service`'s logging.json: JSON lines, and logging no longer looks up each record's caller, thread
    and process (time per access line), while a line keeps every field it had."""
    monkeypatch.setattr(logging, "_srcfile", logging.addLevelName.__code__.co_filename)  # logging's defaults, whatever
    for switch in ("logThreads", "logProcesses", "logMultiprocessing"):  # ran before; all put back after the test
        monkeypatch.setattr(logging, switch, True)
    monkeypatch.setattr(logging.root, "handlers", [])
    config = json.loads(LOG_CONFIG.read_text())
    logging.config.dictConfig({**config, "root": {"handlers": ["stderr"]}, "loggers": {}})  # no levels changed
    formatter = logging.root.handlers[0].formatter
    assert isinstance(formatter, JSONFormatter)
    assert logging._srcfile is None and not (logging.logThreads or logging.logProcesses or logging.logMultiprocessing)
    record = logging.getLogger("service.access").makeRecord(
        "service.access", logging.INFO, "(unknown file)", 0, "hi %s", ("you",), None, extra={"status": 200}
    )
    assert record.threadName is None and record.processName is None
    line = json.loads(formatter.format(record))
    assert set(line) == {"time", "level", "logger", "message", "status"} and line["message"] == "hi you"


def test_unexpected_errors_are_500_problems_without_internals(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret internals at /srv/app")

    monkeypatch.setattr(pipeline, "run_pipeline", broken)
    with TestClient(create_app(Settings(warmup=False)), raise_server_exceptions=False) as c:
        with caplog.at_level(logging.ERROR, logger="service"):
            r = c.post(URL, files=FILES, headers={"X-Request-ID": "oops-1"})
        assert_problem(r, 500, "about:blank", None, "oops-1")
        assert "secret" not in r.text and r.headers["x-request-id"] == "oops-1"
        logged = [rec for rec in caplog.records if rec.exc_info]
        assert logged and "secret internals" in JSONFormatter().format(logged[0])
        assert json.loads(JSONFormatter().format(logged[0]))["request_id"] == "oops-1"
        monkeypatch.undo()
        assert c.post(URL, files=FILES, data=SMALL).status_code == 200
        # Every request, the 500 too, has left the worker's count: a lone light prediction may run on the loop again.
        assert c.app_state["metrics"].requests_in_flight == 0


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB"),
        torch.AcceleratorError("CUDA error: out of memory"),  # pinned host memory: not an OutOfMemoryError
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 206359805952 bytes."),
        MemoryError(),
    ],
)
def test_out_of_memory_is_a_503_and_the_server_stays_up(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    def oom(*args: Any, **kwargs: Any) -> None:
        raise error

    with make_client() as c:
        monkeypatch.setattr(pipeline, "run_pipeline", oom)
        r = c.post(URL, files=FILES)
        assert_problem(r, 503, "out-of-memory", None, "ran out of memory")
        assert r.headers["retry-after"] == "1"
        monkeypatch.undo()
        assert c.post(URL, files=FILES, data=SMALL).status_code == 200
        # Every request, the 500 too, has left the worker's count: a lone light prediction may run on the loop again.
        assert c.app_state["metrics"].requests_in_flight == 0


@pytest.mark.parametrize("probe_fails", [True, False], ids=["the gpu no longer computes", "a passing error"])
def test_a_device_error_is_a_503_and_a_gpu_that_no_longer_computes_is_taken_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, probe_fails: bool
) -> None:
    def device_error(*args: Any, **kwargs: Any) -> None:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    def probe(name: str) -> None:
        if probe_fails:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(devices, "_visible_devices", lambda: ["cpu", "cuda:0"])  # as if torch saw a GPU
    monkeypatch.setattr(devices, "_out_of_service", {})
    monkeypatch.setattr(devices, "probe", probe)
    with make_client() as c:
        monkeypatch.setattr(pipeline, "run_pipeline", device_error)
        with caplog.at_level(logging.ERROR, logger="service"):
            r = c.post(URL, files=FILES, data={"spec": '{"device": "cpu"}'}, headers={"X-Request-ID": "gpu-1"})
        fragment = "cuda:0 no longer computes and is out of service" if probe_fails else "retry (logged"
        assert_problem(r, 503, "device-failed", None, fragment)
        assert r.headers["retry-after"] == "1" and "gpu-1" in r.json()["detail"]
        assert any(rec.exc_info and "illegal memory access" in str(rec.exc_info[1]) for rec in caplog.records)
        assert devices.available_devices() == (["cpu"] if probe_fails else ["cpu", "cuda:0"])
        monkeypatch.undo()


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/v1/predict", "application/json"), ("/v1/featuremaps", "application/json"), ("/v2/models/cnn/infer", "")],
)
def test_a_client_that_hangs_up_mid_body_is_a_499_not_a_server_error(
    client: TestClient, caplog: pytest.LogCaptureFixture, path: str, content_type: str
) -> None:
    """The client sends part of its body and closes: counted and logged as 499, nginx's "client closed request"."""
    parts = [{"type": "http.request", "body": b'{"pix', "more_body": True}, {"type": "http.disconnect"}]
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    headers = [(b"content-length", b"100")] + ([(b"content-type", content_type.encode())] if content_type else [])
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "state": dict(client.app_state),
    }  # fmt: skip
    with caplog.at_level(logging.INFO, logger="service"):
        asyncio.run(client.app(scope, receive, send))
    assert messages[0]["type"] == "http.response.start" and messages[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    [line] = [r for r in caplog.records if r.name == "service.access"]
    assert getattr(line, "status", None) == 499
    assert re.search(r'requests_total\{method="POST",route="[^"]+",status="499"\} 1', client.get("/metrics").text)


def test_compute_deadline_stops_the_work_with_a_504() -> None:
    with make_client(compute_timeout_s=1e-9) as c:
        assert_problem(c.post(URL, files=FILES), 504, "compute-timeout", None, "limit")
        assert_problem(c.post("/v1/models/cnn/featuremaps", files=FILES), 504, "compute-timeout", None, "limit")
        batch = {"images": [base64.b64encode(DOG.read_bytes()).decode()] * 2}
        assert_problem(c.post("/v1/predict", json=batch), 504, "compute-timeout", None, "while preparing images[0]")


def test_metrics_count_requests_per_route_and_status(client: TestClient) -> None:
    client.post(URL, files=FILES, data=SMALL)
    client.get("/no/such/path/12345")
    client.post(URL, json={"image": "%%%"})
    text = client.get("/metrics").text
    assert re.search(r'featuremap_requests_total\{method="POST",route="/v1/featuremaps",status="200"\} [1-9]', text)
    assert re.search(r'featuremap_requests_total\{method="POST",route="/v1/featuremaps",status="422"\} [1-9]', text)
    assert 'route="unmatched"' in text and "12345" not in text  # no label per unknown path
    for method in ("BREW", "XYZZY123"):  # nor per made-up method
        client.request(method, URL)
    text = client.get("/metrics").text
    assert re.search(r'featuremap_requests_total\{method="OTHER",route="/v1/featuremaps",status="405"\} 2', text)
    assert client.app_state["metrics"].requests_in_flight == 0  # 200, 404, 422 and 405 all counted out again
    assert "BREW" not in text and "XYZZY123" not in text
    for name in (
        "featuremap_request_duration_seconds_bucket",
        "featuremap_requests_in_flight",
        "featuremap_compute_queue_depth",
    ):
        assert name in text


# --- admission control -----------------------------------------------------------------------------------------


def test_admission_queues_then_refuses_and_holds_slots_until_the_work_ends() -> None:
    async def scenario() -> None:
        admission = Admission(limit=1, queue=1, wait_s=30)  # the queued waiter's wait: ample, whatever the host does
        release = threading.Event()
        holder = asyncio.create_task(admission.run(release.wait, 30))
        await asyncio.sleep(0.05)
        waiter = asyncio.create_task(admission.run(lambda: "second"))
        await asyncio.sleep(0.05)
        assert (admission.active, admission.waiting) == (1, 1)
        with pytest.raises(OverloadedError, match="1 waiting") as full:  # the queue is full: refused at once
            await admission.run(lambda: None)
        assert full.value.reason == "queue_full"
        release.set()
        assert await asyncio.gather(holder, waiter) == [True, "second"]
        assert (admission.active, admission.waiting) == (0, 0)
        admission.close()
        admission = Admission(limit=1, queue=1, wait_s=0.2)
        release.clear()
        holder = asyncio.create_task(admission.run(release.wait, 30))
        await asyncio.sleep(0.05)
        with pytest.raises(OverloadedError, match="within 0.2 s") as late:  # queued, but no slot in time
            await admission.run(lambda: None)
        assert late.value.reason == "queue_wait"
        holder.cancel()  # the client hangs up: its work still holds the slot until it ends
        await asyncio.sleep(0.05)
        assert admission.active == 1
        release.set()
        for _ in range(500):  # the freed work ends on its thread; its slot comes back right after
            if admission.active == 0:
                break
            await asyncio.sleep(0.01)
        assert (admission.active, admission.waiting) == (0, 0)
        admission.close()

    asyncio.run(scenario())


@pytest.fixture
def gated_pipeline(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """run_pipeline blocks until the test sets the returned event."""
    gate = threading.Event()
    real = pipeline.run_pipeline

    def gated(*args: Any, **kwargs: Any) -> Any:
        gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_pipeline", gated)
    yield gate
    gate.set()


def test_a_full_server_answers_503_with_retry_after(gated_pipeline: threading.Event) -> None:
    with make_client(max_concurrency=1, max_queue=0) as c:
        admission = c.app_state["admission"]
        first: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: first.update(r=c.post(URL, files=FILES, data=SMALL)))
        worker.start()
        for _ in range(1000):
            if admission.active == 1:
                break
            threading.Event().wait(0.01)
        r = c.post(URL, files=FILES, data=SMALL)
        assert_problem(r, 503, "overloaded", None, "retry shortly")
        assert r.headers["retry-after"] == "1"
        assert refusals(c) == {
            "queue_full": 1,
            "queue_wait": 0,
            "batch_queue_full": 0,
            "request_bodies": 0,
            "responses": 0,
        }
        assert c.get("/healthz").status_code == 200  # probes never queue
        gated_pipeline.set()
        worker.join(30)
        assert first["r"].status_code == 200
        assert c.post(URL, files=FILES, data=SMALL).status_code == 200


# --- API keys and CORS -----------------------------------------------------------------------------------------

PROTECTED = [
    ("GET", "/v1/filters", {}),
    ("GET", "/v1/models", {}),
    ("GET", "/v1/models/cnn", {}),
    ("POST", URL, {"files": FILES, "data": SMALL}),
    ("POST", "/v1/predict", {"files": FILES}),
    ("POST", "/predict", {"files": FILES}),
    ("POST", "/v1/models/cnn/featuremaps", {"files": FILES}),
]


@pytest.fixture(scope="module")
def keyed() -> Iterator[TestClient]:
    with make_client(api_keys=["key-one", "key-two"]) as c:
        yield c


@pytest.mark.parametrize(("method", "path", "kwargs"), PROTECTED)
def test_api_keys_guard_every_v1_route(keyed: TestClient, method: str, path: str, kwargs: dict[str, Any]) -> None:
    r = keyed.request(method, path, **kwargs)
    assert_problem(r, 401, "unauthorized", None, "needs an API key")
    assert "Bearer" in r.headers["www-authenticate"]
    wrong = keyed.request(method, path, headers={"X-API-Key": "key-three"}, **kwargs)
    assert_problem(wrong, 401, "unauthorized", None, "not valid")
    assert keyed.request(method, path, headers={"X-API-Key": "key-two"}, **kwargs).status_code == 200
    assert keyed.request(method, path, headers={"Authorization": "Bearer key-one"}, **kwargs).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json"])
def test_probes_and_docs_stay_open_with_api_keys(keyed: TestClient, path: str) -> None:
    assert keyed.get(path).status_code == 200


@pytest.mark.parametrize(
    ("headers", "valid"),
    [
        ([(b"x-api-key", "clé-über".encode())], True),  # the key's UTF-8 bytes, as a client sends it
        ([(b"authorization", b"Bearer " + "clé-über".encode())], True),
        ([(b"x-api-key", "clé-über".encode("latin-1"))], False),  # other bytes: another key
    ],
)
def test_a_key_beyond_ascii_matches_its_utf8_bytes(headers: list[tuple[bytes, bytes]], valid: bool) -> None:
    """On the raw header bytes, which TestClient would transcode (its client reads them back as text first)."""
    scope = {"type": "http", "headers": headers, "state": {"settings": Settings(api_keys=["clé-über"])}}
    check = require_api_key(Request(scope))
    if valid:
        asyncio.run(check)
    else:
        with pytest.raises(UnauthorizedError, match="not valid"):
            asyncio.run(check)


def test_api_keys_and_origins_come_from_comma_separated_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATUREMAP_API_KEYS", " a1 , b2,")
    monkeypatch.setenv("FEATUREMAP_CORS_ORIGINS", "https://app.example")
    settings = Settings()
    assert settings.api_keys == ["a1", "b2"] and settings.cors_origins == ["https://app.example"]


def test_cors_allows_only_configured_origins() -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    with make_client(cors_origins=["https://app.example"]) as c:
        ok = c.options(URL, headers={"Origin": "https://app.example", **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        r = c.get("/healthz", headers={"Origin": "https://app.example"})
        assert "X-Request-ID" in r.headers["access-control-expose-headers"]
        other = c.options(URL, headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in other.headers
        assert_problem(other, 400, "about:blank", None, "CORS preflight refused: this origin is not allowed")
        put = c.options(
            URL, headers={**preflight, "Origin": "https://evil.example", "Access-Control-Request-Method": "PUT"}
        )
        assert_problem(put, 400, "about:blank", None, "this origin, method is not allowed")
    with make_client() as c:  # none by default
        r = c.get("/healthz", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize(
    "path", ["/healthz", "/readyz", "/v1/models", "/v1/models/cnn", "/v1/filters", "/metrics", "/v2/health/live"]
)
def test_head_answers_as_get_without_the_body(client: TestClient, path: str) -> None:
    get, head = client.get(path), client.head(path)
    assert head.status_code == get.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if "content-length" in get.headers and path != "/metrics":  # /metrics' counts have moved on
        assert head.headers["content-length"] == get.headers["content-length"]
    route = path.replace("/cnn", "/{name}")  # the route's template, as for a GET
    assert f'requests_total{{method="HEAD",route="{route}",status="200"}}' in client.get("/metrics").text


def test_head_on_a_post_only_route_is_a_405_with_its_allow_header(client: TestClient) -> None:
    r = client.head(URL)
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.content == b""
    r = client.request("PUT", URL)
    assert_problem(r, 405, "about:blank", None, "PUT is not allowed on /v1/featuremaps")
