"""How `python -m service` serves connections: its httptools protocol turns Nagle off on every connection, even on
a listening socket bound the way uvicorn binds it for several workers (proto 0, where asyncio leaves Nagle on),
and refuses a request line and headers over 16 KiB (431, problem+json), as h11 did (400); its event loop takes one
waiting connection per wake-up, so that workers sharing the socket take turns."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx
import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import memory
from service.serving import MAX_HEAD_BYTES, FairAcceptEventLoop, HttpToolsNoDelayProtocol


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body and answers its length."""
    assert scope["type"] == "http"
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"ok %d" % size
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def serving(protocol: type[HttpToolsProtocol], asgi_app: ASGIApp = app, **config: Any) -> Iterator[int]:
    """A uvicorn server in a thread on a listening socket bound as uvicorn binds it for several workers; its port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # as uvicorn's Config.bind_socket does
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    assert listener.proto == 0
    server = uvicorn.Server(uvicorn.Config(asgi_app, http=protocol, log_level="error", lifespan="off", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)
        listener.close()


def nodelay_seen(protocol: type[HttpToolsProtocol]) -> list[int]:
    seen: list[int] = []

    class Recording(protocol):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    with serving(Recording) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(3):  # one keep-alive connection
            assert client.get("/").text == "ok 0"
    return seen


@pytest.mark.parametrize(("protocol", "expected"), [(HttpToolsNoDelayProtocol, [1]), (HttpToolsProtocol, [0])])
def test_connections_have_nagle_off(protocol: type[HttpToolsProtocol], expected: list[int]) -> None:
    """The plain protocol is the control: it shows the socket this test builds does reproduce the problem."""
    assert [int(bool(v)) for v in nodelay_seen(protocol)] == expected


def head(header_bytes: int, body: bytes = b"") -> bytes:
    """A POST whose head (request line, a padding header of `header_bytes` bytes, Content-Length) is sent whole."""
    return (
        b"POST /x HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * header_bytes + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


CHUNKED = b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"


def exchange(port: int, *writes: bytes, answers: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Sends `writes` on one connection (Nagle off: each goes out as written), then reads until `answers` responses
    have come or the server has closed the connection: each response's status, headers and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for data in writes:
            try:
                conn.sendall(data)
            except (BrokenPipeError, ConnectionResetError):  # the server refused and closed: read its answer
                break
        received, responses = b"", []
        while len(responses) < answers:
            try:
                chunk = conn.recv(65536)
            except ConnectionResetError:
                chunk = b""
            received += chunk
            while b"\r\n\r\n" in received:  # parse what is complete
                head, rest = received.split(b"\r\n\r\n", 1)
                status_line, *lines = head.decode("latin-1").split("\r\n")
                headers = dict(line.lower().split(": ", 1) for line in lines)
                size = int(headers["content-length"])
                if len(rest) < size:
                    break
                responses.append((int(status_line.split()[1]), headers, rest[:size]))
                received = rest[size:]
            if not chunk:
                break
        return responses


TOO_LARGE = 431


@pytest.mark.parametrize(
    ("writes", "expected"),
    [
        pytest.param([head(MAX_HEAD_BYTES - 200)], [200], id="a head just within the limit"),
        pytest.param([head(MAX_HEAD_BYTES)], [TOO_LARGE], id="a head just over it, in one write"),
        pytest.param([head(MAX_HEAD_BYTES)[:9000], head(MAX_HEAD_BYTES)[9000:]], [TOO_LARGE], id="in two writes"),
        pytest.param(
            [b"GET /" + b"a" * (MAX_HEAD_BYTES + 100) + b" HTTP/1.1\r\nHost: t\r\n\r\n"], [TOO_LARGE], id="a long URL"
        ),
        pytest.param(
            [head(100, b"b" * 600_000), head(100, b"c" * 70_000)], [200, 200], id="large bodies, then another request"
        ),
        pytest.param([head(100, b"b" * 1000) + head(100, b"c" * 70_000)], [200, 200], id="two requests in one write"),
        pytest.param(
            [CHUNKED, *[b"400\r\n" + b"d" * 1024 + b"\r\n"] * 64, b"0\r\nX-Sum: 1\r\n\r\n", head(100)],
            [200, 200],
            id="a chunked body in 64 writes, a trailer, then another request",
        ),
        pytest.param(
            [CHUNKED, *[b"1\r\n", b"e\r\n"] * 20, b"0\r\n\r\n"], [200], id="chunk sizes in writes of their own"
        ),
        pytest.param(
            [CHUNKED + b"5\r\nhello\r\n0\r\nX-Sum: " + b"f" * MAX_HEAD_BYTES + b"\r\n\r\n"],
            [TOO_LARGE],
            id="a trailer over it",
        ),
    ],
)
def test_a_request_line_and_headers_over_16_kib_are_refused(writes: list[bytes], expected: list[int]) -> None:
    """As h11's `max_incomplete_event_size` did, now with 431 and a problem+json body; bodies, however large, do
    not count towards the next head."""
    with serving(HttpToolsNoDelayProtocol) as port:
        responses = exchange(port, *writes, answers=len(expected))
    assert [status for status, _, _ in responses] == expected
    for status, headers, body in responses:
        if status == TOO_LARGE:
            assert headers["content-type"] == "application/problem+json" and headers["connection"] == "close"
            problem = json.loads(body)
            assert problem["status"] == TOO_LARGE and problem["title"] == "Request Header Fields Too Large"
            assert problem["type"] == "about:blank" and f"over {MAX_HEAD_BYTES} bytes" in problem["detail"]


@pytest.mark.parametrize(
    ("request_bytes", "config", "status", "fragment"),
    [
        (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n", {}, 400, "could not be parsed as HTTP/1.1"),
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", {}, 400, "parsed"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {}, 400, "parsed"),  # HTTP/2's preface
        (b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", {"limit_concurrency": 1}, 503, "at its limit of concurrent"),
    ],
    ids=["negative length", "length and chunked", "http/2 preface", "past the concurrency limit"],
)
def test_uvicorns_own_refusals_are_problem_json(
    request_bytes: bytes, config: dict[str, Any], status: int, fragment: str
) -> None:
    """What uvicorn answers itself, in plain text, before the app sees the request."""
    with serving(HttpToolsNoDelayProtocol, **config) as port:
        [(got, headers, body)] = exchange(port, request_bytes, answers=1)
    assert got == status and headers["content-type"] == "application/problem+json"
    problem = json.loads(body)
    assert problem["status"] == status and problem["type"] == "about:blank" and fragment in problem["detail"]
    assert headers["connection"] == "close" and (status != 503 or headers["retry-after"] == "1")


@pytest.mark.parametrize(("protocol", "closed"), [(HttpToolsNoDelayProtocol, True), (HttpToolsProtocol, False)])
def test_a_connection_that_sends_nothing_is_closed_as_an_idle_kept_alive_one(
    protocol: type[HttpToolsProtocol], closed: bool
) -> None:
    """uvicorn's own protocol (the control) keeps a silent connection open past the keep-alive timeout; this one
    closes it then, and still serves a connection whose request comes within it."""
    with serving(protocol, timeout_keep_alive=1) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=4) as silent:
            try:
                assert (silent.recv(1) == b"") is closed  # closed after 1 s: end of stream
            except TimeoutError:
                assert not closed
        assert [status for status, _, _ in exchange(port, head(10), answers=1)] == [200]


class QuickHead(HttpToolsNoDelayProtocol):
    @property
    def head_timeout_s(self) -> float:
        return 1.0


def test_a_head_that_trickles_in_is_cut_off_at_the_time_limit_with_a_408() -> None:
    """A client sending a header line every 0.3 s (each byte disarms the keep-alive timeout) is answered 408 once its
    head has taken longer than the limit (here 1 s; FEATUREMAP_BODY_TIMEOUT_S, 60 s, in the service)."""
    with serving(QuickHead) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for sent in range(1, 31):  # 9 s at most
                time.sleep(0.3)
                conn.sendall(b"X-Slow: %d\r\n" % sent)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                answer += chunk
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"connection: close" in head
    assert b"content-type: application/problem+json" in head and json.loads(body)["status"] == 408
    assert json.loads(body)["detail"] == "the request line and headers did not arrive within 1 s"
    assert sent < 30  # cut off, not let run


async def answers_in_2_s(scope: Scope, receive: Receive, send: Send) -> None:
    await asyncio.sleep(2)
    await app(scope, receive, send)


def test_a_slow_pipelined_head_is_refused_after_the_answer_before_it_not_in_its_midst() -> None:
    with serving(QuickHead, answers_in_2_s) as port:
        responses = exchange(port, head(10) + b"GET /next HTTP/1.1\r\nHost: t\r\n", answers=2)
    assert [status for status, _, _ in responses] == [200, 408]
    assert responses[0][2] == b"ok 0"


async def answers_at_once(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers before reading the body, as a 413 or 415 on a request's head does."""
    await send({"type": "http.response.start", "status": 415, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize(("protocol", "closed"), [(HttpToolsNoDelayProtocol, True), (HttpToolsProtocol, False)])
def test_a_connection_answered_early_is_closed_when_idle_after_its_body(
    protocol: type[HttpToolsProtocol], closed: bool
) -> None:
    """The rest of the body, sent after the answer, disarmed uvicorn's keep-alive timeout (the control keeps the
    connection open); this protocol arms it again once the body has ended."""
    with serving(protocol, answers_at_once, timeout_keep_alive=1) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=4) as conn:
            conn.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 200000\r\n\r\n" + b"a" * 1000)
            assert conn.recv(65536).startswith(b"HTTP/1.1 415 ")
            conn.sendall(b"b" * 199_000)
            try:
                assert (conn.recv(1) == b"") is closed  # closed 1 s after the body ended: end of stream
            except TimeoutError:
                assert not closed


def test_the_control_plain_httptools_takes_any_head() -> None:
    """uvicorn's own httptools protocol answers the over-limit head: the limit above is this service's."""
    with serving(HttpToolsProtocol) as port:
        assert [status for status, _, _ in exchange(port, head(MAX_HEAD_BYTES), answers=1)] == [200]


@pytest.mark.parametrize(
    "start",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: t\r\nX-Endless: ", id="a header"),
        pytest.param(CHUNKED + b"5\r\nhello\r\n0\r\nX-Endless: ", id="a chunked body's trailer"),
    ],
)
def test_an_endless_header_is_cut_off_near_the_limit(start: bytes) -> None:
    """A header that never ends, sent in 4 KiB pieces: refused once about 16 KiB of it has come, while the client
    is still sending (it never ends, so no measure of the complete head can refuse it), and the connection closed;
    it never reaches the parser's memory whole."""
    with serving(HttpToolsNoDelayProtocol) as port:
        [(status, _, body)] = exchange(port, start, *[b"a" * 4096] * 256, answers=1)
    assert status == TOO_LARGE and json.loads(body)["detail"].endswith(f"did not end within {MAX_HEAD_BYTES} bytes")


def accept_queue_length(listener: socket.socket) -> int:
    """Connections waiting in a listening socket's accept queue: Linux reports it as `tcpi_unacked` (the fifth
    32-bit field of `struct tcp_info`, after eight one-byte ones) for a socket in the LISTEN state."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, 8 + 4 * 4)[0])


def left_waiting_after_one_pass(loop_class: type[asyncio.AbstractEventLoop], waiting: int) -> int:
    """`waiting` connections queue on a listening socket before the loop looks; one short pass of the loop
    (a `sleep(0)`); then how many are still waiting to be accepted."""
    loop = loop_class()
    transports: list[asyncio.BaseTransport] = []

    class Keep(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)

    try:
        server = loop.run_until_complete(loop.create_server(Keep, "127.0.0.1", 0, backlog=64))
        listener = server.sockets[0]
        clients = [socket.create_connection(listener.getsockname()) for _ in range(waiting)]
        ready = socket.socket(fileno=os.dup(listener.fileno()))  # the same listening socket, to count with
        ready.setblocking(False)
        deadline = time.monotonic() + 10
        while accept_queue_length(ready) < waiting:  # every handshake done: all of them wait to be accepted
            assert time.monotonic() < deadline, accept_queue_length(ready)
            time.sleep(0.001)  # polling a condition, with a deadline
        loop.run_until_complete(asyncio.sleep(0))
        left = 0
        while True:
            try:
                conn, _ = ready.accept()
            except BlockingIOError:
                break
            conn.close()
            left += 1
        while len(transports) < waiting - left:  # the loop makes the connections it accepted
            assert time.monotonic() < deadline, (len(transports), waiting - left)
            loop.run_until_complete(asyncio.sleep(0))
        for transport in transports:
            transport.close()
        for client in clients:
            client.close()
        ready.close()
        server.close()
        loop.run_until_complete(server.wait_closed())
        return left
    finally:
        loop.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="reads the accept queue through Linux's TCP_INFO")
@pytest.mark.parametrize(("loop_class", "most_taken"), [(FairAcceptEventLoop, 3), (asyncio.SelectorEventLoop, 8)])
def test_the_loop_takes_one_waiting_connection_per_wakeup(
    loop_class: type[asyncio.AbstractEventLoop], most_taken: int
) -> None:
    """asyncio's own loop (the control) takes all 8 at once; ours one per turn of the loop, and running a
    `sleep(0)` to completion takes three turns (the step, the task's end, its done callback)."""
    taken = 8 - left_waiting_after_one_pass(loop_class, 8)
    assert 1 <= taken <= most_taken
    if loop_class is asyncio.SelectorEventLoop:
        assert taken == 8


def test_python_m_service_serves_with_this_protocol_and_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `make run` and the image start: the protocol and the loop above, whatever the worker count."""
    import service.__main__ as entry

    seen: list[dict[str, object]] = []
    monkeypatch.setattr(entry.uvicorn, "run", lambda app, **kwargs: seen.append(kwargs))
    for name in ("WEB_CONCURRENCY", entry.READY_DIR_ENV, "PROMETHEUS_MULTIPROC_DIR", "GLIBC_TUNABLES"):
        monkeypatch.setenv(name, "")  # main() sets them: recorded here, so that they are restored after the test
        monkeypatch.delenv(name)
    for workers in ("1", "2"):
        entry.main(["--workers", workers])
        monkeypatch.delenv("WEB_CONCURRENCY")  # as from a clean environment each time
        assert os.environ["GLIBC_TUNABLES"] == memory.GLIBC_TUNABLES  # what the workers start with
    assert [(k["workers"], k["http"], k["loop"]) for k in seen] == [
        (n, HttpToolsNoDelayProtocol, "service.serving:FairAcceptEventLoop") for n in (1, 2)
    ]
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")  # an operator's own choice stands
    entry.main(["--workers", "2"])
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4"


MIB = 1024 * 1024
LARGE = 24 * MIB  # far more than the sockets' buffers take: the server's transport holds the rest


def with_send_timeout(seconds: float) -> type[HttpToolsNoDelayProtocol]:
    class Timed(HttpToolsNoDelayProtocol):
        @property
        def send_timeout_s(self) -> float:
            return seconds

    return Timed


@pytest.mark.parametrize(
    ("protocol", "reads", "taken_whole"),
    [
        (with_send_timeout(0.5), [], False),  # takes nothing: cut off, and the app's sends return
        (with_send_timeout(0.5), [16 * 1024] * 20, True),  # 16 KiB every 0.1 s for 2 s: slow, never stalled
        (with_send_timeout(30), [], True),  # a 2 s stall is within the timeout
        (HttpToolsProtocol, [], True),  # the control: uvicorn's own protocol waits for ever
    ],
    ids=["stalled", "slow-reader", "within-timeout", "plain-httptools"],
)
def test_a_client_that_takes_none_of_its_response_for_the_send_timeout_is_cut_off(
    protocol: type[HttpToolsProtocol], reads: list[int], taken_whole: bool
) -> None:
    """The app sends 24 MiB in 1 MiB slices to a client that reads little or nothing for 2 s, then reads all it
    can. Cut off, the app's sends all return within those 2 s (its response can be freed) and the client gets
    less than the whole body; otherwise the app is still sending when the client starts reading it all."""
    sends_returned = threading.Event()

    async def large(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        headers = [(b"content-type", b"application/octet-stream"), (b"content-length", b"%d" % LARGE)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for end in range(MIB, LARGE + 1, MIB):
            await send({"type": "http.response.body", "body": b"x" * MIB, "more_body": end < LARGE})
        sends_returned.set()

    with serving(protocol, large) as port, socket.socket() as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # before connecting: the window stays small
        conn.settimeout(30)
        conn.connect(("127.0.0.1", port))
        conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        received = 0
        start = time.monotonic()
        for size in reads:
            time.sleep(0.1)
            received += len(conn.recv(size))
        sends_returned.wait(max(0.0, start + 2 - time.monotonic()))
        sent_all_before_reading = sends_returned.is_set()
        while chunk := _recv_or_reset(conn):
            received += len(chunk)
    head = len(b"HTTP/1.1 200 OK\r\n")
    assert (received > LARGE + head) is taken_whole, received  # the head's other lines are fewer than 200 bytes
    assert sent_all_before_reading is not taken_whole


def _recv_or_reset(conn: socket.socket) -> bytes:
    try:
        return conn.recv(MIB)
    except ConnectionResetError:
        return b""


@dataclass
class _Timer:
    when: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class _Clock:
    """The parts of an event loop the send timeout uses: its clock and `call_later`, run by hand in time order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[_Timer] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def run_until(self, end: float, done: Callable[[], bool]) -> None:
        while not done() and (live := [t for t in self.timers if not t.cancelled]):
            first = min(live, key=lambda t: t.when)
            if first.when > end:
                return
            self.timers.remove(first)
            self.now = first.when
            first.callback()


class _StalledTransport:
    """A transport whose bytes waiting for the client follow `waiting(now)`; it records when it was aborted."""

    def __init__(self, clock: _Clock, waiting: Callable[[float], int]) -> None:
        self.clock, self.waiting = clock, waiting
        self.aborted_at: float | None = None

    def get_write_buffer_size(self) -> int:
        return self.waiting(self.clock.now)

    def get_extra_info(self, name: str) -> None:
        return None  # no socket: the transport's buffer is all there is to see

    def abort(self) -> None:
        self.aborted_at = self.clock.now


# The bytes waiting for a client after the writer paused at 0 s (send timeout 1 s, looked at every 0.25 s) -> when
# the connection is reset: between 1 and 1.25 timeouts after the last byte taken, and never for a steady reader.
WATCH_CASES = [
    ("takes nothing", lambda t: 100_000, 1.0),
    ("its kernel takes some at once, then nothing", lambda t: 100_000 if t == 0 else 90_000, 1.25),
    ("takes a byte a look", lambda t: 100_000 - int(t * 4), None),
    ("reads until 3.1 s", lambda t: 100_000 - int(min(t, 3.1) * 1000), 4.25),
]


@pytest.mark.parametrize(("waiting", "reset_at"), [c[1:] for c in WATCH_CASES], ids=[c[0] for c in WATCH_CASES])
def test_a_paused_writer_is_reset_one_timeout_after_the_client_last_took_a_byte(
    waiting: Callable[[float], int], reset_at: float | None
) -> None:
    clock = _Clock()
    transport = _StalledTransport(clock, waiting)
    protocol = object.__new__(with_send_timeout(1.0))  # only what the send timeout touches
    protocol.loop, protocol.transport, protocol.logger = clock, transport, logging.getLogger("test")
    protocol.flow = FlowControl(transport)  # type: ignore[arg-type]
    protocol.pause_writing()
    clock.run_until(100.0, lambda: transport.aborted_at is not None)
    assert transport.aborted_at == pytest.approx(reset_at) if reset_at is not None else transport.aborted_at is None
