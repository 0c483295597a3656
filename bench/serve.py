"""Throughput and latency over HTTP, against baselines measured in the same run.

    .venv/bin/python -m bench.serve --seconds 10

Every server starts on 127.0.0.1 (one process, or the workers its row names) and waits while wrk (Debian's `wrk`,
installed with apt-get) loads each in turn, round after round, with a multipart upload of a 28x28 PNG digit:
16 connections for throughput, 1 for latency. Baselines: the framework floor (a bare FastAPI endpoint that
parses the same upload and returns a constant), a tutorial-style FastAPI app serving the same shipped CNN, and,
for one client, a bound: the floor's endpoint plus this service's own work for the upload, inline on the event
loop (bench/apps/bound.py). For /v1/featuremaps, the time the service adds on top of the work itself (decode +
pipeline + encode, timed in-process in the same run) is reported as a ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BOUNDARY = "featuremapbench"


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def multipart(fields: dict[str, bytes | str]) -> bytes:
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f"--{BOUNDARY}\r\n".encode())
        if isinstance(value, bytes):
            out.write(f'Content-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'.encode())
            out.write(b"Content-Type: image/png\r\n\r\n" + value + b"\r\n")
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


def wrk(url: str, body: bytes, connections: int, seconds: float, content_type: str) -> Load:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "body").write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text(
            f'local f = io.open("{tmp}/body", "rb")\nwrk.body = f:read("*all")\nf:close()\nwrk.method = "POST"\n'
            f'wrk.headers["Content-Type"] = "{content_type}"\n'
        )
        cmd = [
            "wrk",
            "-t",
            str(min(connections, 2)),
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(seconds))}s",
            "--timeout",
            "60s",
            "--latency",
            "-s",
            str(script),
            url,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Load(rps, ms("50"), ms("99"), int(errors.group(1)) if errors else 0)


def ratios_to_first(rounds: list[list[Load]], row: int) -> tuple[float, float, float]:
    """Each round's req/s of `row` over the first row's (the floor) in that same round: their median, lowest and
    highest. The spread shows how far one invocation's median can be trusted on a machine that drifts."""
    ratios = [r[row].rps / r[0].rps for r in rounds]
    return float(np.median(ratios)), min(ratios), max(ratios)


def in_turn(urls: list[str], round_: int, load: Callable[[str], Load]) -> list[Load]:
    """`load` each url once, first to last in even rounds and last to first in odd ones; results in `urls`' order."""
    order = range(len(urls)) if round_ % 2 == 0 else range(len(urls) - 1, -1, -1)
    loads = {i: load(urls[i]) for i in order}
    return [loads[i] for i in range(len(urls))]


# The standard library's HTTP client, so that this module runs where only the service's own packages are installed
# (a GPU machine for bench/cuda.py); never through a proxy that the environment may name.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Server:
    """One server process on a free port; waits until `ready_path` answers 200."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None, ready_path: str = "/docs") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="bench-", suffix=".log", delete=False)
        full = [c.replace("{port}", str(self.port)) for c in cmd]
        self.proc = subprocess.Popen(
            full, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=self.log, stderr=self.log
        )
        for _ in range(600):
            try:
                with DIRECT.open(self.url + ready_path, timeout=1) as answer:
                    if answer.status == 200:
                        return
            except urllib.error.HTTPError as not_ready:  # answered, but not ready yet (503)
                not_ready.close()
            except (urllib.error.URLError, OSError):  # not listening yet
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{cmd} did not start; see {self.log.name}")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def uvicorn(app: str, workers: int = 1) -> list[str]:
    """A baseline app under plain uvicorn; with workers, under the service's protocol (Nagle off), since plain
    uvicorn's workers keep Nagle on and stall 40 ms a request here, and its event loop, since asyncio's lets one
    worker take a whole burst of new connections (see service/serving.py): the baselines get the same fixes."""
    cmd = [sys.executable, "-m", "uvicorn", app, "--port", "{port}", "--log-level", "warning", "--no-access-log"]
    if workers > 1:
        cmd += ["--workers", str(workers), "--http", "service.serving:HttpToolsNoDelayProtocol"]
        cmd += ["--loop", "service.serving:FairAcceptEventLoop"]
    return cmd


def curl(url: str, body: Path, content_type: str) -> tuple[float, int]:
    """One POST by curl (C, so the client adds next to nothing): its own total time in seconds, and the size of
    the answer, which must be a 200."""
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total} %{size_download}",
         "-H", f"Content-Type: {content_type}", "--data-binary", f"@{body}", url],
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout.split()  # fmt: skip
    assert out[0] == "200", out
    return float(out[1]), int(out[2])


def digit_png() -> bytes:
    from service.datasets import load_mnist

    buf = io.BytesIO()
    Image.fromarray(load_mnist("test").images[0]).save(buf, format="PNG")
    return buf.getvalue()


def in_process_featuremaps(image: bytes, spec: dict[str, object], repeats: int) -> float:
    """Median seconds for decode + pipeline + encode, called directly (no HTTP), as the route does it."""
    from service.api.deps import ImagePayload
    from service.api.featuremaps import _featuremaps
    from service.config import Settings
    from service.cpus import threads_per_slot
    from service.memory import tune_allocator
    from service.schemas import FeaturemapsSpec

    tune_allocator()  # as every server worker does
    torch.set_num_threads(threads_per_slot(Settings().compute_slots))
    payload = ImagePayload(image, FeaturemapsSpec.model_validate(spec))
    settings = Settings()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _featuremaps(payload, settings, False)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--only", choices=["predict", "featuremaps"], help="run one half of the scenarios")
    p.add_argument("--runs", type=int, default=4, help="rounds, half in each order (the median is reported)")
    p.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="alternated HTTP and in-process runs per feature-map case (those of a fraction of a second get 3x as "
        "many: their few tens of ms of HTTP make the ratios most sensitive to the machine's noise)",
    )
    args = p.parse_args()
    if not shutil.which("wrk"):
        print("wrk is not installed: apt-get install -y wrk")
        return 2
    os.environ.pop("WEB_CONCURRENCY", None)  # the service's own default: a worker per usable CPU
    if args.only != "featuremaps":
        predict_scenarios(args)
    if args.only != "predict":
        featuremaps_scenarios(args)
    return 0


CTYPE = f"multipart/form-data; boundary={BOUNDARY}"
SERVICE = [sys.executable, "-m", "service", "--port", "{port}"]


def predict_scenarios(args: argparse.Namespace) -> None:
    digit = multipart({"image": digit_png()})
    rows: list[tuple[str, list[str], str, str, dict[str, str]]] = []
    queue = {"FEATUREMAP_MAX_QUEUE": "64"}
    for name, cmd, path, ready, env in [
        ("floor: bare FastAPI, parse multipart, constant", uvicorn("bench.apps.floor:app"), "/predict", "/docs", {}),
        ("  the same, 2 workers (Nagle off, fair accept)", uvicorn("bench.apps.floor:app", 2), "/predict", "/docs", {}),
        ("tutorial-style FastAPI + the same CNN", uvicorn("bench.apps.tutorial:app"), "/predict", "/docs", {}),
        (
            "  the same, 2 workers of 1 torch thread (Nagle off, fair accept)",
            uvicorn("bench.apps.tutorial:app", 2),
            "/predict",
            "/docs",
            {"OMP_NUM_THREADS": "1"},
        ),
        (
            "bound: the floor + this service's work, inline on its loop",
            uvicorn("bench.apps.bound:app"),
            "/predict",
            "/docs",
            {},
        ),
        ("this service: /v1/predict (cnn), defaults", SERVICE, "/v1/predict", "/readyz", queue),
        (
            "  the same, workers not pinned to a CPU each",
            SERVICE,
            "/v1/predict",
            "/readyz",
            {**queue, "FEATUREMAP_PIN_WORKERS": "false"},
        ),
        (
            "  the same, micro-batching off",
            SERVICE,
            "/v1/predict",
            "/readyz",
            {**queue, "FEATUREMAP_BATCH_MAX_SIZE": "1"},
        ),
        (
            "  the same, 1 worker (the default before)",
            SERVICE,
            "/v1/predict",
            "/readyz",
            {**queue, "WEB_CONCURRENCY": "1"},
        ),
    ]:
        rows.append((name, cmd, path, ready, env))
    with contextlib.ExitStack() as stack:
        # All the servers start first and wait, idle, while each in turn is loaded: every round loads each
        # once, so the machine's drift (tens of percent within minutes here) touches every row alike, and each
        # round's ratios compare runs made seconds apart. Each run opens new connections. Every other round
        # goes through the servers in reverse: in a fixed order, of three identical servers the second was
        # faster than the first in 7 rounds of 8 (by 3% in the median), and a drift within a round would
        # favour one end of the table.
        servers = [stack.enter_context(Server(cmd, env, ready)) for _, cmd, _, ready, env in rows]
        urls = [server.url + path for server, (_, _, path, _, _) in zip(servers, rows, strict=True)]
        for url in urls:
            wrk(url, digit, 16, 2, CTYPE)  # warm-up
        rounds = [in_turn(urls, r, lambda url: wrk(url, digit, 16, args.seconds, CTYPE)) for r in range(args.runs)]
        ones = [in_turn(urls, r, lambda url: wrk(url, digit, 1, args.seconds, CTYPE)) for r in range(args.runs)]
    print(
        f"\n/predict, multipart 28x28 PNG, {args.seconds:g} s per run, wrk on the same cores, {args.runs} rounds "
        "that each load every server in turn (every other round in reverse); 16 clients: the median req/s (and "
        "the range); vs floor: the median of each round's ratio to the 1-process floor in that round (and the "
        "lowest and highest round's); 1 client: the median of the rounds' p50s"
    )
    print(
        f"{'server':<66}{'16 clients req/s':>17}{'range':>12}{'p50 ms':>8}{'p99 ms':>8}{'vs floor':>9}"
        f"{'its range':>11}{'1 client p50 ms':>17}{'non-2xx':>9}"
    )
    for i, (name, *_) in enumerate(rows):
        runs = sorted((r[i] for r in rounds), key=lambda load: load.rps)
        many = runs[len(runs) // 2]
        ratio, lowest, highest = ratios_to_first(rounds, i)
        one = float(np.median([o[i].p50_ms for o in ones]))
        errors = sum(r[i].errors for r in rounds) + sum(o[i].errors for o in ones)
        print(
            f"{name:<66}{many.rps:>17.0f}{f'{runs[0].rps:.0f}-{runs[-1].rps:.0f}':>12}{many.p50_ms:>8.2f}"
            f"{many.p99_ms:>8.2f}{ratio:>9.2f}{f'{lowest:.2f}-{highest:.2f}':>11}{one:>17.2f}{errors:>9}"
        )


def featuremap_cases() -> list[tuple[str, bytes, int, dict[str, object]]]:
    """The issue's /v1/featuremaps requests: (name, image, how many times `--repeats` to run it, spec)."""
    dog = (ROOT / "service" / "samples" / "dog.jpg").read_bytes()
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save(big, format="PNG")
    # 3-D kernels (3x3 on each of R, G, B, summed): 16 maps per stage, the 16 MB of float32 the issue describes
    sixteen = [{"kernel": np.random.default_rng(i).standard_normal((3, 3, 3)).round(3).tolist()} for i in range(16)]
    rgb16 = {
        "color": "rgb",
        "layers": [{"op": "conv", "filters": sixteen, "padding": "same"}, {"op": "relu"}, {"op": "pool", "size": 2}],
    }
    # The third member: how many times `--repeats` a case is run. The cases of a fraction of a second, whose tens of
    # milliseconds of HTTP are the most sensitive to the machine's noise, get three times as many pairs.
    return [
        ("dog, default pipeline, PNG maps", dog, 3, {}),
        ("1024x1024 RGB, 16 3x3 -> relu -> pool, PNG", big.getvalue(), 1, {**rgb16, "output": {"format": "png"}}),
        (
            "1024x1024 RGB, 16 3x3 -> relu -> pool, JSON pool",
            big.getvalue(),
            3,
            {**rgb16, "output": {"format": "json", "stages": [2]}},
        ),
        (
            "  the same, base64 float16",
            big.getvalue(),
            3,
            {**rgb16, "output": {"format": "json", "stages": [2], "tensor_encoding": "base64", "dtype": "float16"}},
        ),
    ]


def featuremaps_scenarios(args: argparse.Namespace) -> None:
    cases = featuremap_cases()
    print(
        f"\n/v1/featuremaps, 1 client: end-to-end over HTTP against the same work in-process, alternated "
        f"{args.repeats} times for the 1024x1024 PNG maps and {3 * args.repeats} for the others (medians); added: the "
        "median over the pairs of an HTTP run and an in-process run, taken in turn first in a pair"
    )
    print(f"{'case':<48}{'in-process ms':>14}{'HTTP ms':>12}{'added':>8}{'response MB':>13}")
    with Server(SERVICE, {}, "/readyz") as server, tempfile.TemporaryDirectory() as tmp:
        for name, image, times, spec in cases:
            (Path(tmp) / "body").write_bytes(multipart({"image": image, "spec": json.dumps(spec)}))
            post = functools.partial(curl, server.url + "/v1/featuremaps", Path(tmp) / "body", CTYPE)
            size = post()[1]  # warm-up, both ways
            in_process_featuremaps(image, spec, 1)
            http_s, work_s = [], []
            for i in range(args.repeats * times):
                if i % 2:  # every other pair the other way round: a drift within pairs favours neither side
                    work_s.append(in_process_featuremaps(image, spec, 1))
                http_s.append(post()[0])
                if not i % 2:
                    work_s.append(in_process_featuremaps(image, spec, 1))
            work, http = float(np.median(work_s)) * 1000, float(np.median(http_s)) * 1000
            # Each HTTP run against the in-process run next to it: the machine's drift (tens of percent within a
            # minute here) moves both of a pair alike, where it can move the two medians apart.
            added = float(np.median([h / w for h, w in zip(http_s, work_s, strict=True)])) - 1
            print(f"{name:<48}{work:>14.1f}{http:>12.1f}{added * 100:>7.1f}%{size / 1e6:>13.1f}")


if __name__ == "__main__":
    sys.exit(main())
