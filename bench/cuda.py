"""CUDA against the CPU on one machine, over HTTP: the issue's requests, each sent with `"device": "cuda"` and with
`"device": "cpu"` in turn to one server, timed end to end, and their answers compared.

    .venv/bin/python -m bench.cuda

/v1/featuremaps: the cases of bench/serve.py (the dog with the default pipeline, PNG maps; a 1024x1024 RGB image
through 16 3x3x3 filters -> ReLU -> max pool: PNG maps of every stage, the pooled stage as JSON, and as base64
float16), by curl where it is installed, alternated `--repeats` times (medians). /v1/predict: a multipart 28x28 PNG
digit from 16 clients and from 1, by a load generator of this module on keep-alive connections, alternated `--runs`
times; it reports how busy it kept its own CPU (well below a whole one, it was not what limited the rate).

Answers must match: maps to one 8-bit level (two float32 computations can round to either side of a level), tensors
to 1e-5 of the largest value (float16's rounding on top for the base64 case), and predictions to 1e-5, with the
same label. Exits 2 where no CUDA device is visible or `--device` names none of them (nothing measured), 1 when
answers differ. `--device cpu` compares the CPU with itself, a dry run of every step on a machine without a GPU.
The server runs as docker-compose's and Kubernetes' GPU deployments run it: one worker (one CUDA context, every
prediction batched on the one device), `WEB_CONCURRENCY=1`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.serve import CTYPE, SERVICE, Server, curl, digit_png, featuremap_cases, multipart


@dataclass
class Rate:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    busy: float  # the load generator's CPU time over the run's wall time


def load(url: str, body: bytes, content_type: str, clients: int, seconds: float) -> Rate:
    """`clients` keep-alive connections each POSTing `body` back to back for `seconds`."""
    return asyncio.run(_load(url, body, content_type, clients, seconds))


async def _load(url: str, body: bytes, content_type: str, clients: int, seconds: float) -> Rate:
    where = urllib.parse.urlsplit(url)
    host, port = where.hostname or "127.0.0.1", where.port or 80
    head = f"POST {where.path} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: {content_type}\r\n"
    request = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    latencies: list[float] = []
    errors = 0
    start, cpu = time.perf_counter(), time.process_time()
    deadline = start + seconds

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                writer.write(request)
                status = await read_response(reader)
                latencies.append(time.perf_counter() - sent)
                errors += status >= 300
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    ms = np.percentile(latencies, [50, 99]) * 1000
    return Rate(
        len(latencies), len(latencies) / wall, float(ms[0]), float(ms[1]), errors, (time.process_time() - cpu) / wall
    )


async def read_response(reader: asyncio.StreamReader) -> int:
    """One HTTP/1.1 response, its body read and dropped; its status."""
    lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(b":", 1) for line in lines[1:] if b":" in line)
    length = {k.strip().lower(): v.strip() for k, v in headers.items()}.get(b"content-length")
    if length is None:
        raise RuntimeError("an answer without Content-Length: this generator reads only those")
    await reader.readexactly(int(length))
    return status


def fetch(url: str, body: bytes, content_type: str) -> bytes:
    """One POST by the standard library's client: the answer's body, which must be a 200."""
    where = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=600)
    try:
        conn.request("POST", where.path, body, {"Content-Type": content_type})
        answer = conn.getresponse()
        data = answer.read()
    finally:
        conn.close()
    if answer.status != 200:
        raise RuntimeError(f"{url}: {answer.status} {data[:500]!r}")
    return data


def post_seconds(url: str, body: Path, content_type: str) -> float:
    """One POST's time: by curl (C, adding next to nothing) where installed, else by the standard library."""
    if shutil.which("curl"):
        return curl(url, body, content_type)[0]
    start = time.perf_counter()
    fetch(url, body.read_bytes(), content_type)
    return time.perf_counter() - start


# Two float32 computations of a map agree to rounding, not bit for bit: the sums run in another order, and cuDNN may
# choose a Winograd or FFT convolution. The CUDA tests hold maps to the CPU's within 1e-5 too.
FLOAT32_TOLERANCE = 1e-5  # of the largest value in the stage


def _levels(png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png))), dtype=np.int16)


def compare_featuremaps(want: dict[str, Any], got: dict[str, Any]) -> tuple[bool, str]:
    """Whether two /v1/featuremaps answers for the same request agree, and how closely."""
    if len(want["stages"]) != len(got["stages"]):
        return False, f"{len(want['stages'])} stages against {len(got['stages'])}"
    worst, off, pixels = 0.0, 0, 0
    for a, b in zip(want["stages"], got["stages"], strict=True):
        if (a["index"], a["op"], a["shape"]) != (b["index"], b["op"], b["shape"]):
            return False, f"stage {a['index']} {a['op']} {a['shape']} against {b['index']} {b['op']} {b['shape']}"
        if "maps" in a:  # PNG levels: the same, or one level apart where a value lies at a level's edge
            for x, y in zip(a["maps"], b["maps"], strict=True):
                diff = np.abs(_levels(x) - _levels(y))
                if diff.max() > 1:
                    return False, f"stage {a['index']}: maps {int(diff.max())} levels apart"
                off, pixels = off + int(np.count_nonzero(diff)), pixels + diff.size
            continue
        if "data_base64" in a:
            dtype = {"float16": "<f2", "float32": "<f4"}[a["dtype"]]
            x, y = (np.frombuffer(base64.b64decode(s["data_base64"]), dtype).astype(np.float64) for s in (a, b))
            rtol = FLOAT32_TOLERANCE + (
                2.0**-10 if a["dtype"] == "float16" else 0
            )  # float16: one unit in the last place
        else:
            x, y = np.asarray(a["data"], np.float64).ravel(), np.asarray(b["data"], np.float64).ravel()
            rtol = FLOAT32_TOLERANCE
        scale = max(float(np.abs(x).max(initial=0)), 1e-30)
        error = float(np.abs(x - y).max(initial=0)) / scale
        if error > rtol:
            return False, f"stage {a['index']}: values {error:.1e} of the largest apart"
        worst = max(worst, error)
    if off:
        return True, f"{off / pixels:.4%} of the levels one apart, the rest equal"
    if pixels:
        return True, "levels equal"
    return True, f"values within {worst:.1e} of the largest"


def compare_predictions(want: dict[str, Any], got: dict[str, Any]) -> tuple[bool, str]:
    a, b = np.asarray(want["probabilities"]), np.asarray(got["probabilities"])
    error = float(np.abs(a - b).max())
    if want["label"] != got["label"] or error > 1e-5:
        return False, f"labels {want['label']} and {got['label']}, probabilities {error:.1e} apart"
    return True, f"the same label, probabilities within {error:.1e}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="what to compare with the CPU (cpu: a dry run without a GPU)")
    p.add_argument("--repeats", type=int, default=5, help="pairs per feature-map case (3x for the short ones)")
    p.add_argument("--runs", type=int, default=4, help="pairs of prediction loads per client count")
    p.add_argument("--seconds", type=float, default=5, help="each prediction load's length")
    args = p.parse_args()
    device: str = args.device
    if device != "cpu" and not torch.cuda.is_available():
        print(f"no CUDA device is visible here (torch {torch.__version__}): nothing to compare")
        return 2
    visible = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if device != "cpu" else []
    if device != "cpu" and ("cuda:0" if device == "cuda" else device) not in visible:
        print(f"{device} is not a device here; visible: {', '.join(visible)}")
        return 2
    what = torch.cuda.get_device_name(device) if device != "cpu" else "the CPU itself: a dry run"
    print(
        f"{device} ({what}) against the CPU ({os.cpu_count()} CPUs), one `python -m service` as the GPU deployments "
        "run it: one worker (WEB_CONCURRENCY=1, one CUDA context), the rest its defaults"
    )
    same = True
    sides = ("cpu", device)  # two sides, the same device in a dry run
    env = {"WEB_CONCURRENCY": "1", "FEATUREMAP_MAX_QUEUE": "64"}
    with Server(SERVICE, env, "/readyz") as server, tempfile.TemporaryDirectory() as tmp:
        print(f"\n/v1/featuremaps, 1 client, {args.repeats}x pairs (3x that for the short cases), medians")
        print(f"{'case':<48}{'cpu ms':>10}{f'{device} ms':>10}{'speedup':>9}{'MB':>7}  answers")
        url = server.url + "/v1/featuremaps"
        for name, image, times, spec in featuremap_cases():
            bodies = [Path(tmp) / f"{side}.body" for side in range(2)]
            for path, d in zip(bodies, sides, strict=True):
                path.write_bytes(multipart({"image": image, "spec": json.dumps({**spec, "device": d})}))
            answers = [fetch(url, path.read_bytes(), CTYPE) for path in bodies]  # the warm-up too
            ok, detail = compare_featuremaps(*(json.loads(a) for a in answers))
            same &= ok
            seconds: tuple[list[float], list[float]] = ([], [])
            for i in range(args.repeats * times):
                for side in (0, 1) if i % 2 == 0 else (1, 0):
                    seconds[side].append(post_seconds(url, bodies[side], CTYPE))
            cpu_ms, dev_ms = (statistics.median(s) * 1000 for s in seconds)
            verdict = ("match: " if ok else "DIFFER: ") + detail
            row = f"{name:<48}{cpu_ms:>10.1f}{dev_ms:>10.1f}{cpu_ms / dev_ms:>8.2f}x{len(answers[1]) / 1e6:>7.1f}"
            print(f"{row}  {verdict}")

        url = server.url + "/v1/predict"
        digits = [multipart({"image": digit_png(), "device": d}) for d in sides]
        ok, detail = compare_predictions(*(json.loads(fetch(url, digit, CTYPE)) for digit in digits))
        same &= ok
        print(f"\n/v1/predict, a multipart 28x28 PNG digit; answers {'match' if ok else 'DIFFER'}: {detail}")
        print(
            f"{'clients':<10}{'device':<10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}{'generator busy':>16}"
        )
        for digit in digits:
            load(url, digit, CTYPE, 16, 2)  # warm-up: the device's batches and threads
        for clients in (16, 1):
            rates: tuple[list[Rate], list[Rate]] = ([], [])
            for i in range(args.runs):
                for side in (0, 1) if i % 2 == 0 else (1, 0):
                    rates[side].append(load(url, digits[side], CTYPE, clients, args.seconds))
            for d, runs in zip(sides, rates, strict=True):
                mid = sorted(runs, key=lambda r: r.rps)[len(runs) // 2]
                errors, busy = sum(r.errors for r in runs), max(r.busy for r in runs)
                print(
                    f"{clients:<10}{d:<10}{mid.rps:>9.0f}{mid.p50_ms:>9.2f}{mid.p99_ms:>9.2f}{errors:>9}{busy:>15.0%}"
                )
    if not same:
        print("\nanswers on the two devices differ (see above)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
