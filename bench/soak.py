"""Soak test: a bounded mixed load (good and bad requests on every endpoint) against a real server on 127.0.0.1.

    .venv/bin/python -m bench.soak --duration 300 --clients 32

Starts `python -m service` (the run command) on a free port, warms it up, then runs `--clients` concurrent
clients for `--duration` seconds and reports requests served, status counts per kind, p50/p99 latency, and the
server's RSS after warm-up and at the end. It exits non-zero on any 5xx or when RSS grew by 10% or more.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DOG = (ROOT / "service" / "samples" / "dog.jpg").read_bytes()


def digit_png(seed: int) -> bytes:
    from service.datasets import load_mnist

    digit = load_mnist("test").images[seed]
    buf = io.BytesIO()
    Image.fromarray(255 - digit).resize((140, 140)).save(buf, format="PNG")
    return buf.getvalue()


def requests_mix() -> list[tuple[str, str, str, dict[str, Any]]]:
    """(kind, method, path, httpx kwargs): what a frontend, a service and a careless client send."""
    digit = digit_png(0)
    digit_b64 = base64.b64encode(digit).decode()
    pixels = (np.asarray(Image.open(io.BytesIO(digit)).convert("L").resize((28, 28))) ^ 255).tolist()
    return [
        ("featuremaps png", "POST", "/v1/featuremaps", {"files": {"image": ("dog.jpg", DOG)}}),
        ("featuremaps json", "POST", "/v1/featuremaps", {"files": {"image": ("dog.jpg", DOG)}, "data": {"spec": json.dumps({"output": {"format": "json", "stages": [2]}})}}),
        ("featuremaps rgb sobel", "POST", "/v1/featuremaps", {"json": {"image": base64.b64encode(DOG).decode(), "color": "rgb", "layers": [{"op": "conv", "filters": "sobel", "padding": "same"}, {"op": "relu"}]}}),
        ("predict cnn", "POST", "/predict", {"files": {"image": ("d.png", digit)}}),
        ("predict mlp pixels", "POST", "/v1/predict", {"json": {"model": "mlp", "pixels": pixels}}),
        ("predict batch", "POST", "/v1/predict", {"json": {"images": [digit_b64] * 8}}),
        ("cnn featuremaps", "POST", "/v1/models/cnn/featuremaps", {"files": {"image": ("d.png", digit)}}),
        ("models", "GET", "/v1/models", {}),
        ("filters", "GET", "/v1/filters", {}),
        ("healthz", "GET", "/healthz", {}),
        ("bad spec", "POST", "/v1/featuremaps", {"json": {"image": digit_b64, "layers": [{"op": "pool", "size": 0}]}}),
        ("bad kernel", "POST", "/v1/featuremaps", {"json": {"image": digit_b64, "layers": [{"op": "conv", "filters": [{"kernel": [[1, 2], [3]]}]}]}}),
        ("not an image", "POST", "/v1/featuremaps", {"files": {"image": ("x.txt", b"hello " * 100)}}),
        ("unknown model", "POST", "/v1/predict", {"json": {"model": "resnet", "image": digit_b64}}),
        ("bad pixels", "POST", "/v1/predict", {"json": {"pixels": [[0] * 27] * 28}}),
        ("wrong content type", "POST", "/v1/predict", {"content": b"seven", "headers": {"Content-Type": "text/plain"}}),
        ("no route", "GET", "/v1/nothing-here", {}),
        ("too many layers", "POST", "/v1/featuremaps", {"json": {"image": digit_b64, "layers": [{"op": "relu"}] * 17}}),
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    """The server's resident memory: the process and, with several workers, every process under it."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total = int(line.split()[1]) / 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                total += rss_mib(int(child))
            except (FileNotFoundError, ProcessLookupError):  # a child that just ended
                pass
    return total


async def client_loop(
    client: httpx.AsyncClient, mix: list[tuple[str, str, str, dict[str, Any]]], until: float, rng: random.Random,
    results: list[tuple[str, int, float]],
) -> None:  # fmt: skip
    while time.monotonic() < until:
        kind, method, path, kwargs = rng.choice(mix)
        start = time.perf_counter()
        try:
            r = await client.request(method, path, **kwargs)
            status = r.status_code
        except httpx.HTTPError:
            status = 0  # the connection failed: counted apart from HTTP statuses
        results.append((kind, status, time.perf_counter() - start))


async def sample_rss(pid: int, until: float, every: float, samples: list[float]) -> None:
    while time.monotonic() < until:
        await asyncio.sleep(min(every, max(until - time.monotonic(), 0)))
        samples.append(rss_mib(pid))


async def run_load(
    url: str, clients: int, seconds: float, seed: int, pid: int, samples: list[float]
) -> list[tuple[str, int, float]]:
    mix = requests_mix()
    results: list[tuple[str, int, float]] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        until = time.monotonic() + seconds
        await asyncio.gather(
            sample_rss(pid, until, max(seconds / 10, 1), samples),
            *(client_loop(client, mix, until, random.Random(seed + i), results) for i in range(clients)),
        )
    return results


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=300)
    p.add_argument("--warmup", type=float, default=20)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    port = free_port()
    env = {**os.environ, "FEATUREMAP_MAX_QUEUE": str(args.clients)}
    log = tempfile.NamedTemporaryFile(prefix="soak-server-", suffix=".log", delete=False)
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        warm_samples: list[float] = []
        asyncio.run(run_load(url, args.clients, args.warmup, args.seed + 1000, server.pid, warm_samples))
        rss_start = rss_mib(server.pid)
        samples: list[float] = []
        started = time.monotonic()
        results = asyncio.run(run_load(url, args.clients, args.duration, args.seed, server.pid, samples))
        elapsed = time.monotonic() - started
        rss_end = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(60)

    statuses = Counter(s for _, s, _ in results)
    by_kind: dict[str, Counter[int]] = {}
    for kind, status, _ in results:
        by_kind.setdefault(kind, Counter())[status] += 1
    latencies = [t * 1000 for _, _, t in results]
    print(f"soak: {args.clients} clients for {elapsed:.0f} s against {url} (python -m service, 1 worker)")
    print(f"requests: {len(results):,} ({len(results) / elapsed:.1f}/s)   statuses: {dict(sorted(statuses.items()))}")
    print(
        f"latency ms: p50 {percentile(latencies, 50):.1f}   p99 {percentile(latencies, 99):.1f}   max {max(latencies):.1f}"
    )
    print(
        f"server RSS MiB: {rss_start:.1f} after warm-up -> {rss_end:.1f} at the end ({(rss_end / rss_start - 1) * 100:+.1f}%)"
    )
    print(f"  during warm-up: {' '.join(f'{s:.0f}' for s in warm_samples)}")
    print(f"  during the run: {' '.join(f'{s:.0f}' for s in samples)}")
    print(f"{'kind':<24}{'count':>8}  statuses   p50 ms")
    for kind in sorted(by_kind):
        kind_ms = [t * 1000 for k, _, t in results if k == kind]
        print(f"{kind:<24}{sum(by_kind[kind].values()):>8}  {dict(by_kind[kind])}   {statistics.median(kind_ms):.1f}")
    five_xx = sum(n for s, n in statuses.items() if s >= 500 or s == 0)
    grew = rss_end / rss_start - 1
    print(f"5xx or failed connections: {five_xx}; RSS growth {grew * 100:.1f}% (limit 10%)")
    return 1 if five_xx or grew >= 0.10 else 0


if __name__ == "__main__":
    sys.exit(main())
