"""End to end over real HTTP: the uvicorn server in-process, and the README's run command as a subprocess."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time

import httpx2 as httpx
import pytest
from PIL import Image, ImageDraw

from service.api.render import SlicedResponse
from tests.conftest import DOG, ROOT, make_client

pytestmark = pytest.mark.e2e


def wait_ready(client: httpx.Client, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("server never became ready")


def test_dog_through_a_real_server(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        wait_ready(client)
        files = {"image": ("dog.jpg", DOG.read_bytes(), "image/jpeg")}
        r = client.post("/v1/featuremaps", files=files)
        assert r.status_code == 200
        assert [s["shape"] for s in r.json()["stages"]] == [[4, 297, 297], [4, 297, 297], [4, 148, 148]]

        r = client.post("/v1/featuremaps", files=files, headers={"Accept": "image/png"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).format == "PNG"

        r = client.post("/v1/featuremaps", files={"image": ("x.txt", b"hello")})
        assert r.status_code == 415 and r.headers["content-type"] == "application/problem+json"


def test_a_body_of_several_slices_arrives_whole_through_a_real_server(base_url: str) -> None:
    """The dog's maps as float tensors: a JSON body of several `SlicedResponse` slices, byte for byte the body
    the app gives in-process (the test client joins the slices itself, without a socket)."""
    files = {"image": ("dog.jpg", DOG.read_bytes(), "image/jpeg")}
    data = {"spec": '{"output": {"format": "json"}}'}
    with make_client() as in_process:
        expected = in_process.post("/v1/featuremaps", files=files, data=data)
    assert expected.status_code == 200 and len(expected.content) > 2 * SlicedResponse.SLICE
    with httpx.Client(base_url=base_url, timeout=30) as client:
        wait_ready(client)
        r = client.post("/v1/featuremaps", files=files, data=data)
    assert r.status_code == 200
    assert r.headers["content-length"] == str(len(expected.content))
    assert r.content == expected.content


def test_a_drawn_digit_through_a_real_server(base_url: str) -> None:
    page = Image.new("L", (300, 200), 255)
    ImageDraw.Draw(page).line([(150, 30), (150, 170)], fill=0, width=14)  # a "1", dark on white, off-centre
    buf = io.BytesIO()
    page.save(buf, format="JPEG")
    with httpx.Client(base_url=base_url, timeout=30) as client:
        wait_ready(client)
        for model in ("cnn", "mlp"):
            r = client.post("/predict", files={"image": ("one.jpg", buf.getvalue())}, data={"model": model})
            assert r.status_code == 200, r.text
            assert r.json()["label"] == 1 and r.json()["model"] == model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_run_command_serves_the_app_with_settings_from_the_environment() -> None:
    port = free_port()
    env = {**os.environ, "FEATUREMAP_MAX_LAYERS": "2"}
    cmd = [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # few lines
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            wait_ready(client)
            spec = '{"layers": [{"op": "relu"}, {"op": "relu"}, {"op": "relu"}]}'
            r = client.post("/v1/featuremaps", files={"image": ("dog.jpg", DOG.read_bytes())}, data={"spec": spec})
            assert r.status_code == 413 and "limit is 2" in r.json()["detail"]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status says why it stopped
    assert proc.returncode in (0, -15), err.decode()
    assert b"Application shutdown complete" in err
