"""A real uvicorn server on 127.0.0.1 (an ephemeral port) in a background thread, as httpx's own tests do."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from service.config import Settings
from service.main import create_app


class ThreadedServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # signals belong to the test runner's main thread
        pass


@pytest.fixture(scope="session")
def base_url() -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    config = uvicorn.Config(create_app(Settings()), log_level="warning", timeout_graceful_shutdown=5)
    server = ThreadedServer(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    yield f"http://{host}:{port}"
    server.should_exit = True
    thread.join(10)
    sock.close()
