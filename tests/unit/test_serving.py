"""The h11 protocol `python -m service` runs: Nagle off on every connection, even on a listening socket bound
the way uvicorn binds it for several workers (proto 0, where asyncio leaves Nagle on)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx2 as httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.serving import H11NoDelayProtocol


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def nodelay_seen(protocol: type[H11Protocol]) -> list[int]:
    seen: list[int] = []

    class Recording(protocol):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # as uvicorn's Config.bind_socket does
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    assert listener.proto == 0
    server = uvicorn.Server(uvicorn.Config(app, http=Recording, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(3):  # one keep-alive connection
                assert client.get("/").text == "ok"
    finally:
        server.should_exit = True
        thread.join(30)
        listener.close()
    return seen


@pytest.mark.parametrize(("protocol", "expected"), [(H11NoDelayProtocol, [1]), (H11Protocol, [0])])
def test_connections_have_nagle_off(protocol: type[H11Protocol], expected: list[int]) -> None:
    """The plain protocol is the control: it shows the socket this test builds does reproduce the problem."""
    assert [int(bool(v)) for v in nodelay_seen(protocol)] == expected
