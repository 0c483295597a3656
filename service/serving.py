"""uvicorn's HTTP/1.1 protocol (h11), with TCP_NODELAY set on every connection.

asyncio turns Nagle's algorithm off only for sockets whose `proto` is IPPROTO_TCP. With `--workers` above 1,
uvicorn binds the listening socket itself as `socket(AF_INET, SOCK_STREAM)` (proto 0), so the connections its
workers accept keep Nagle on: a response written as headers then body waits for the client's delayed ACK, and
each request takes 40 ms (seen here: 2 workers answered 357 req/s where 1 answered 2,200, and a lone client
waited 44 ms for a 0.5 ms answer). Setting the option on each connection makes any worker count behave."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class H11NoDelayProtocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


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
