"""bench/cuda.py: how it judges two devices' answers alike, its load generator's reading of answers, and its refusal
to measure where no CUDA device is visible."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from bench import cuda


def png(levels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(levels.astype(np.uint8), "L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def maps_answer(*maps: np.ndarray, shape: list[int] | None = None) -> dict[str, Any]:
    stage = {"index": 0, "op": "conv", "shape": shape or [len(maps), 4, 4], "maps": [png(m) for m in maps]}
    return {"stages": [stage]}


def data_answer(values: np.ndarray) -> dict[str, Any]:
    return {"stages": [{"index": 2, "op": "pool", "shape": list(values.shape), "data": values.tolist()}]}


def base64_answer(values: np.ndarray, dtype: str) -> dict[str, Any]:
    raw = base64.b64encode(values.astype({"float16": "<f2", "float32": "<f4"}[dtype]).tobytes()).decode()
    return {"stages": [{"index": 2, "op": "pool", "shape": list(values.shape), "data_base64": raw, "dtype": dtype}]}


LEVELS = np.arange(16).reshape(4, 4) * 16
VALUES = np.random.default_rng(0).standard_normal((2, 3, 3)).astype(np.float32)
NUDGED = VALUES.copy()
NUDGED[0, 0, 0] = np.nextafter(VALUES[0, 0, 0], np.float32(np.inf))  # one float32 step


def bumped(by: float) -> np.ndarray:
    """VALUES with one value moved by `by` of the largest."""
    out = VALUES.copy()
    out[1, 2, 2] += np.float32(by * np.abs(VALUES).max())
    return out


@pytest.mark.parametrize(
    ("want", "got", "same", "says"),
    [
        (maps_answer(LEVELS), maps_answer(LEVELS), True, "levels equal"),
        (maps_answer(LEVELS), maps_answer(LEVELS + np.eye(4, dtype=int)), True, "25.0000% of the levels one apart"),
        (maps_answer(LEVELS), maps_answer(LEVELS + 2 * np.eye(4, dtype=int)), False, "2 levels apart"),
        (maps_answer(LEVELS), maps_answer(LEVELS, LEVELS), False, "stage 0 conv [1, 4, 4] against 0 conv [2, 4, 4]"),
        (maps_answer(LEVELS), {"stages": []}, False, "1 stages against 0"),
        (data_answer(VALUES), data_answer(NUDGED), True, "values within"),
        (data_answer(VALUES), data_answer(bumped(5e-6)), True, "values within 5.0e-06"),
        (data_answer(VALUES), data_answer(bumped(2e-5)), False, "values 2.0e-05 of the largest apart"),
        (data_answer(VALUES), data_answer(VALUES * np.float32(1.001)), False, "of the largest apart"),
        (base64_answer(VALUES, "float32"), base64_answer(NUDGED, "float32"), True, "values within"),
        (base64_answer(VALUES, "float16"), base64_answer(VALUES * np.float32(1.0004), "float16"), True, "values"),
        (base64_answer(VALUES, "float16"), base64_answer(VALUES * np.float32(1.01), "float16"), False, "apart"),
    ],
)
def test_featuremaps_answers_agree_to_a_level_or_to_rounding(
    want: dict[str, Any], got: dict[str, Any], same: bool, says: str
) -> None:
    ok, detail = cuda.compare_featuremaps(want, got)
    assert ok is same
    assert says in detail


@pytest.mark.parametrize(
    ("got", "same"),
    [
        ({"label": 7, "probabilities": [0.1, 0.9]}, True),
        ({"label": 7, "probabilities": [0.1 + 5e-6, 0.9 - 5e-6]}, True),
        ({"label": 7, "probabilities": [0.1 + 1e-4, 0.9 - 1e-4]}, False),
        ({"label": 1, "probabilities": [0.1, 0.9]}, False),
    ],
)
def test_predictions_agree_in_label_and_to_1e5(got: dict[str, Any], same: bool) -> None:
    assert cuda.compare_predictions({"label": 7, "probabilities": [0.1, 0.9]}, got)[0] is same


def test_answers_are_read_to_their_length_one_after_another() -> None:
    async def read(stream: bytes) -> list[int]:
        reader = asyncio.StreamReader()
        reader.feed_data(stream)
        reader.feed_eof()
        return [await cuda.read_response(reader), await cuda.read_response(reader)]

    two = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello" + b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"
    assert asyncio.run(read(two)) == [200, 503]
    with pytest.raises(RuntimeError, match="without Content-Length"):
        asyncio.run(read(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n" * 2))


@pytest.fixture
def canned_server() -> Iterator[tuple[str, list[bytes]]]:
    """A server on 127.0.0.1 that answers every request on a connection with the next canned answer, in turn."""
    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"HTTP/1.1 503 No\r\nContent-Length: 0\r\n\r\n"]
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            turn, pending = 0, b""
            while not stop.is_set():
                chunk = conn.recv(65536)
                if not chunk:
                    return
                pending += chunk
                while b"\r\n\r\n" in pending:  # a request: headers, and a body of its Content-Length
                    head, _, rest = pending.partition(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    if len(rest) < length:
                        break
                    pending = rest[length:]
                    conn.sendall(answers[turn % len(answers)])
                    turn += 1

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1/predict", answers
    stop.set()
    listener.close()


def test_the_load_generator_counts_answers_and_refusals(canned_server: tuple[str, list[bytes]]) -> None:
    url, _ = canned_server
    rate = cuda.load(url, b"x" * 100, "application/octet-stream", clients=2, seconds=0.3)
    assert rate.requests > 10
    assert rate.errors in (rate.requests // 2 - 1, rate.requests // 2)  # each connection's every other answer: a 503
    assert 0 < rate.p50_ms <= rate.p99_ms


def test_nothing_is_measured_without_cuda(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["bench.cuda"])
    assert cuda.main() == 2
    assert "no CUDA device is visible here" in capsys.readouterr().out


@pytest.mark.parametrize("device", ["cuda:1", "cuda:7"])
def test_a_device_that_is_not_here_is_refused_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], device: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, cuda:0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr("sys.argv", ["bench.cuda", "--device", device])
    assert cuda.main() == 2
    assert f"{device} is not a device here; visible: cuda:0" in capsys.readouterr().out
