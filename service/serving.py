"""uvicorn's HTTP/1.1 protocol on httptools (llhttp, in C), with TCP_NODELAY set on every connection and the
request's head (request line and headers) bounded as h11 bounds it.

httptools rather than h11 (pure Python): a lone client's prediction took 1.72 against 1.89 ms p50 (8 alternated
rounds, faster in each). h11 refuses a head over its `max_incomplete_event_size`; httptools has no such limit and
keeps a header's value until its end, so this protocol counts the head itself (`MAX_HEAD_BYTES`).

asyncio turns Nagle's algorithm off only for sockets whose `proto` is IPPROTO_TCP. With `--workers` above 1,
uvicorn binds the listening socket itself as `socket(AF_INET, SOCK_STREAM)` (proto 0), so the connections its
workers accept keep Nagle on: a response written as headers then body waits for the client's delayed ACK, and
each request takes 40 ms (seen here: 2 workers answered 357 req/s where 1 answered 2,200, and a lone client
waited 44 ms for a 0.5 ms answer). Setting the option on each connection makes any worker count behave.

uvicorn has no time limit on sending: a client that stops reading keeps its connection, and the response it asked
for stays in memory, for as long as it likes (a feature-map response can be hundreds of MB). This protocol resets
a connection whose client has taken none of the bytes waiting for it for `FEATUREMAP_SEND_TIMEOUT_S`, as nginx's
`send_timeout` with `reset_timedout_connection` does."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import socket
import struct
import termios
from typing import Any

from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings

_TOO_LARGE = "Request Header Fields Too Large"  # RFC 6585's 431
MAX_HEAD_BYTES = 16 * 1024  # a request line and headers larger than this are refused (431)
_LOOKS = 4  # looks at a paused writer per send timeout


@functools.cache
def configured_send_timeout_s() -> float:
    """FEATUREMAP_SEND_TIMEOUT_S, read once per worker (the app has validated the settings as it started)."""
    return Settings().send_timeout_s


@functools.cache
def configured_head_timeout_s() -> float:
    """FEATUREMAP_BODY_TIMEOUT_S, read once per worker: a request's head must arrive within it, as its body must."""
    return Settings().body_timeout_s


class HeadTooLargeError(Exception):
    """A request's head is over `MAX_HEAD_BYTES`; raised in a parser callback, where httptools turns it into a
    parse error."""


class HttpToolsNoDelayProtocol(HttpToolsProtocol):
    """Nagle off; a head over `MAX_HEAD_BYTES` gets 431 (a problem+json body) and the connection closes, where h11
    answered 400 in plain text. The head is measured twice: exactly once it is complete (request line and header
    lines, give or take a byte a header: the space after the colon is optional), and, while it is still arriving,
    as the run of reads that brought none of its end, no body byte and no request's end, so that an endless header
    is cut off after about that many bytes instead of growing in the parser. A chunked body's trailer (header lines
    after its last chunk, which uvicorn adds to the request's headers) counts with the head, both ways. A read
    with any of those events starts the count again without counting itself, so a read that ends one request and
    begins the next (a client that pipelines) leaves that head to the exact measure: memory stays within
    `MAX_HEAD_BYTES` and one read (at most 256 KiB)."""

    _run_bytes = 0  # bytes of the latest reads that brought no head's end, no body byte and no request's end
    _events = 0  # heads ended, body pieces and requests ended on this connection
    _head_size = 0  # the current request's head, as measured once complete, and then its trailer's lines
    _trailing = False  # the current request's headers have ended: any more header lines are its trailer's
    _too_large: str | None = None  # why this connection's request was refused, when its head was over the limit
    _head_begun = False  # a request's head has begun and not ended
    _head_timer: asyncio.TimerHandle | None = None  # from the end of the read a head began in to the head's end
    _stalled: asyncio.TimerHandle | None = None  # while the transport holds more than it wants to: the next look
    _unsent = 0  # the fewest bytes seen waiting for the client (`_unsent_bytes`) since the writer paused
    _quiet = 0  # the looks in a row, since the writer paused, that found none of them taken

    @property
    def send_timeout_s(self) -> float:
        return configured_send_timeout_s()

    @property
    def head_timeout_s(self) -> float:
        return configured_head_timeout_s()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        # uvicorn arms its keep-alive timeout only after a response: a connection that never sends a byte was kept
        # for ever. It gets the same time as an idle kept-alive one; its first byte disarms it, as any request's does.
        self._arm_keep_alive()

    def data_received(self, data: bytes) -> None:
        events = self._events
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._head_begun and self._head_timer is None:  # a head that one read did not bring whole: timed
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_too_slow)
        if events != self._events:
            self._run_bytes = 0
            return
        self._run_bytes += len(data)
        if self._run_bytes > MAX_HEAD_BYTES:
            self._too_large = f"the request line and headers did not end within {MAX_HEAD_BYTES} bytes"
            self.send_400_response(self._too_large)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse (a text/plain 400 there), as problem+json: 431 for a head
        over the limit, else 400 with uvicorn's reason ("Invalid HTTP request received.")."""
        if self._too_large is not None:
            self.logger.warning("Request refused: %s.", self._too_large)
            self._refuse(431, _TOO_LARGE, self._too_large)
        else:
            self._refuse(400, "Bad Request", f"the request could not be parsed as HTTP/1.1: {msg}")

    def _refuse(self, status: int, title: str, detail: str) -> None:
        """Answer with a problem+json of our own, before any app has the request, and close the connection."""
        self._clear_head_timer()
        body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail})
        head = [b"HTTP/1.1 %d " % status + title.encode() + b"\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head.append(b"content-type: application/problem+json\r\ncontent-length: %d\r\n" % len(body))
        self.transport.write(b"".join(head) + b"connection: close\r\n\r\n" + body.encode())
        self.transport.close()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """uvicorn answers a request past its concurrency limit (`--limit-concurrency`) with its own app, in plain
        text: this one says the same as problem+json."""
        super()._start_asgi_task(cycle, _over_the_limit if app is service_unavailable else app)

    def on_message_begin(self) -> None:
        self._trailing = False
        super().on_message_begin()
        # uvicorn has no time limit on a head: a client trickling one (a byte every few seconds) held its connection
        # for ever, the keep-alive timeout disarmed by its first byte. A head that does not come in one read gets the
        # body's time limit (`data_received` starts the timer: none for the many heads that come whole).
        self._head_begun = True

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:  # a pipelined head, behind an answer that is
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_too_slow)  # still going out
            return
        if not self.transport.is_closing():
            detail = f"the request line and headers did not arrive within {self.head_timeout_s:g} s"
            self.logger.warning("Request refused: %s.", detail)
            self._refuse(408, "Request Timeout", detail)

    def _clear_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._trailing:  # a chunked body's trailer: uvicorn adds its lines to the request's headers
            self._head_size += len(name) + len(value) + len(": \r\n")
            if self._head_size > MAX_HEAD_BYTES:
                self._too_large = f"the request line, headers and trailer are over {MAX_HEAD_BYTES} bytes"
                raise HeadTooLargeError(self._too_large)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_begun = False
        self._clear_head_timer()
        self._events += 1
        self._trailing = True
        request_line = len(self.parser.get_method()) + 1 + len(self.url) + len(" HTTP/1.1\r\n")
        size = request_line + sum(len(name) + len(value) + len(": \r\n") for name, value in self.headers) + 2
        self._head_size = size
        if size > MAX_HEAD_BYTES:  # httptools makes this a parse error: uvicorn calls send_400_response
            self._too_large = f"the request line and headers are {size} bytes, over {MAX_HEAD_BYTES} bytes"
            raise HeadTooLargeError(self._too_large)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._events += 1
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._events += 1
        super().on_message_complete()
        # A request answered before its body had all come (a 413 or 415 on its head): its body's bytes disarmed the
        # keep-alive timeout that the answer armed, and only a response arms it again. Armed here, once the body
        # has ended, the connection is closed if no request follows, as after any other answer.
        if self.cycle is not None and self.cycle.response_complete and not self.pipeline:
            self._arm_keep_alive()

    def _arm_keep_alive(self) -> None:
        """As uvicorn arms its keep-alive timeout after a response: the connection closes if it stays idle that long."""
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    # The transport pauses the writer while it holds more than its high-water mark (64 KiB) that the socket did not
    # take, and resumes it when it holds less than a quarter of that. While paused, the bytes waiting for the client
    # are looked at every quarter of the send timeout; once four looks in a row have found none of them taken, the
    # connection is reset (uvicorn then treats the client as gone: the app's pending and later sends return at
    # once, and its response is freed). So a client that stops reading is cut off between 1 and 1.25 timeouts after
    # its last byte was taken, and a slow but steady reader never is. "Taken" is what the network acknowledged: the
    # client's kernel takes in up to its receive buffer's worth after its program has stopped reading.

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stalled is None:
            self._unsent, self._quiet = self._unsent_bytes(), 0
            self._watch_send()

    def resume_writing(self) -> None:
        self._clear_send_timeout()
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._clear_send_timeout()
        self._clear_head_timer()
        super().connection_lost(exc)

    def _unsent_bytes(self) -> int:
        """What the client has yet to take: the transport's buffer and the socket's send queue (bytes sent and not
        acknowledged, or not sent for want of the client's window). The queue shrinks as soon as the client reads;
        the transport's buffer only once the socket has room for a good part of it again."""
        unsent = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            except OSError:  # not a TCP socket (a Unix socket): the transport's buffer alone
                pass
        return unsent

    def _watch_send(self) -> None:
        self._stalled = self.loop.call_later(self.send_timeout_s / _LOOKS, self._on_send_watch)

    def _clear_send_timeout(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _on_send_watch(self) -> None:
        self._stalled = None  # a closing transport still waits for its bytes to be taken: it is cut off alike
        unsent = self._unsent_bytes()
        self._quiet = 0 if unsent < self._unsent else self._quiet + 1  # some taken: count again from 0
        self._unsent = min(unsent, self._unsent)
        if self._quiet < _LOOKS:
            self._watch_send()
            return
        self.logger.warning(
            "Connection reset: the client took none of the %d bytes waiting for it for %g s.",
            unsent,
            self.send_timeout_s,
        )
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # a reset (linger 0): the kernel drops the bytes it still holds for the client, too
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


async def _over_the_limit(scope: Any, receive: Any, send: Any) -> None:
    """uvicorn's `service_unavailable`, as problem+json, and with Retry-After."""
    detail = "the server is at its limit of concurrent connections and requests; retry shortly"
    body = json.dumps({"type": "about:blank", "title": "Service Unavailable", "status": 503, "detail": detail})
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", b"%d" % len(body)),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode(), "more_body": False})


class FairAcceptEventLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop, accepting at most one connection each time the listening socket is ready.

    asyncio accepts up to `backlog` waiting connections per wake-up. The workers of `python -m service` share
    one listening socket, so when clients open connections in a burst (a load balancer's pool, a benchmark)
    the worker that wakes first takes all of them and the others none: with 16 connections opened at once to
    2 workers, one worker held all 16 in two of four tries, and the server ran at one worker's speed. Taking
    one per wake-up, as nginx does by default (`multi_accept off`), lets every woken worker take its turn."""

    def _accept_connection(self, protocol_factory: Any, sock: Any, sslcontext: Any = None, server: Any = None,
                           backlog: int = 100, *args: Any, **kwargs: Any) -> None:  # fmt: skip
        super()._accept_connection(protocol_factory, sock, sslcontext, server, 1, *args, **kwargs)  # type: ignore[misc]
