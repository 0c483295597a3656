"""uvicorn's HTTP/1.1 protocol on httptools (llhttp, in C), with TCP_NODELAY set on every connection and the
request's head (request line and headers) bounded as h11 bounds it.

httptools rather than h11 (pure Python): a lone client's prediction took 1.72 against 1.89 ms p50 (8 alternated
rounds, faster in each). h11 refuses a head over its `max_incomplete_event_size`; httptools has no such limit and
keeps a header's value until its end, so this protocol counts the head itself (`MAX_HEAD_BYTES`).

asyncio turns Nagle's algorithm off only for sockets whose `proto` is IPPROTO_TCP. With `--workers` above 1,
uvicorn binds the listening socket itself as `socket(AF_INET, SOCK_STREAM)` (proto 0), so the connections its
workers accept keep Nagle on: a response written as headers then body waits for the client's delayed ACK, and
each request takes 40 ms (seen here: 2 workers answered 357 req/s where 1 answered 2,200, and a lone client
waited 44 ms for a 0.5 ms answer). Setting the option on each connection makes any worker count behave."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_TOO_LARGE = "Request Header Fields Too Large"  # RFC 6585's 431
MAX_HEAD_BYTES = 16 * 1024  # a request line and headers larger than this are refused (431)


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

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        events = self._events
        super().data_received(data)
        if self.transport.is_closing():
            return
        if events != self._events:
            self._run_bytes = 0
            return
        self._run_bytes += len(data)
        if self._run_bytes > MAX_HEAD_BYTES:
            self._too_large = f"the request line and headers did not end within {MAX_HEAD_BYTES} bytes"
            self.send_400_response(self._too_large)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse; for a head over the limit, 431 as problem+json."""
        if self._too_large is None:
            super().send_400_response(msg)
            return
        self.logger.warning("Request refused: %s.", self._too_large)
        body = json.dumps({"type": "about:blank", "title": _TOO_LARGE, "status": 431, "detail": self._too_large})
        head = [b"HTTP/1.1 431 " + _TOO_LARGE.encode() + b"\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head.append(b"content-type: application/problem+json\r\ncontent-length: %d\r\n" % len(body))
        self.transport.write(b"".join(head) + b"connection: close\r\n\r\n" + body.encode())
        self.transport.close()

    def on_message_begin(self) -> None:
        self._trailing = False
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._trailing:  # a chunked body's trailer: uvicorn adds its lines to the request's headers
            self._head_size += len(name) + len(value) + len(": \r\n")
            if self._head_size > MAX_HEAD_BYTES:
                self._too_large = f"the request line, headers and trailer are over {MAX_HEAD_BYTES} bytes"
                raise HeadTooLargeError(self._too_large)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
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
