"""Abuse against a real server process started as `make run` starts it: slow and endless bodies, SIGTERM
during a request, and schemathesis fuzzing every operation from openapi/openapi.json."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2 as httpx
import pytest
from PIL import Image
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from service.cpus import default_workers, usable_cpus
from tests.conftest import DOG, ROOT, encoded
from tests.e2e.test_server import free_port, wait_ready

pytestmark = pytest.mark.e2e


@contextmanager
def served(
    workers: str | None = "1", environment: dict[str, str] | None = None, **env: str
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """`python -m service` (the run command) on a free port, with `workers` processes (None: its default, one
    per usable CPU), other `environment` variables and FEATUREMAP_* overrides; yields its log file (a file, not a
    pipe: a pipe nobody reads would fill up and block the server's logging)."""
    port = free_port()
    environ = {**os.environ, **(environment or {}), **{f"FEATUREMAP_{k.upper()}": v for k, v in env.items()}}
    environ.pop("WEB_CONCURRENCY", None)
    if workers is not None:
        environ["WEB_CONCURRENCY"] = workers
    cmd = [sys.executable, "-m", "service", "--port", str(port)]
    with tempfile.NamedTemporaryFile(prefix="featuremap-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=log, stderr=log)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            wait_ready(client)
        yield f"http://127.0.0.1:{port}", proc, Path(log.name)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)
        Path(log.name).unlink(missing_ok=True)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def raw_request(port: int, head: str, body_chunks: Iterator[bytes], read_timeout: float) -> tuple[bytes, int]:
    """Send a request by hand, stop sending as soon as the server answers; return (response head, bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head.encode())
        for chunk in body_chunks:
            if select.select([s], [], [], 0)[0]:
                break  # the server has answered (or closed)
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
            sent += len(chunk)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                more = s.recv(65536)
                if not more:
                    break
                data += more
        except ConnectionResetError:
            pass
    return data, sent


def test_a_body_that_never_finishes_arriving_gets_408() -> None:
    with served(body_timeout_s="1") as (url, _, _log):
        port = int(url.rsplit(":", 1)[1])
        head = (
            "POST /v1/featuremaps HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        start = time.monotonic()
        response, _ = raw_request(port, head, iter([b'{"image": "']), read_timeout=10)
        assert response.startswith(b"HTTP/1.1 408"), response[:200]
        assert b"application/problem+json" in response and 1 <= time.monotonic() - start < 8


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_an_endless_body_is_cut_off_at_the_limit_without_memory_growth(declared: bool) -> None:
    with served(max_body_bytes=str(8 * 1024 * 1024)) as (url, proc, _log):
        port = int(url.rsplit(":", 1)[1])
        before = rss_kib(proc.pid)
        chunk = b"A" * 65536
        if declared:
            head = "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2147483648\r\n\r\n"
            chunks: Iterator[bytes] = iter([chunk] * 1024)  # up to 64 MiB of the declared 2 GiB
        else:
            head = "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            chunks = iter([b"10000\r\n" + chunk + b"\r\n"] * 1024)
        response, sent = raw_request(port, head, chunks, read_timeout=30)
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert sent < 40 * 1024 * 1024  # cut off well before the client's 64 MiB
        assert rss_kib(proc.pid) - before < 40 * 1024  # the server did not keep what it was sent
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/readyz").status_code == 200


def test_uploads_past_the_workers_body_budget_get_503_until_the_bodies_in_flight_end() -> None:
    """One client starts a 1 MB upload and stops sending: its worker holds the declared 1 MB from the first read.
    Another's 0.8 MB then does not fit in the 1.5 MB budget (503, Retry-After); once the first client hangs up,
    it does (a 422 here: the bytes are not JSON)."""
    with served(max_body_bytes=str(1_000_000), max_body_bytes_in_flight=str(1_500_000)) as (url, _, log):
        port = int(url.rsplit(":", 1)[1])
        other = (
            "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 800000\r\n\r\n"
        )

        def other_upload() -> bytes:
            return raw_request(port, other, iter([b"x" * 800_000]), read_timeout=30)[0]

        def until(status: bytes) -> bytes:
            deadline = time.monotonic() + 15
            while not (response := other_upload()).startswith(b"HTTP/1.1 " + status) and time.monotonic() < deadline:
                time.sleep(0.05)
            return response

        stalled = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            head = "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
            stalled.sendall(head.encode() + b"x" * 1000)
            refused = until(b"503")
            assert refused.startswith(b"HTTP/1.1 503"), (refused[:300], log.read_text()[-2000:])
            assert b"application/problem+json" in refused and re.search(rb"(?i)\r\nretry-after: 1\r\n", refused)
        finally:
            stalled.close()
        admitted = until(b"422")
        assert admitted.startswith(b"HTTP/1.1 422"), (admitted[:300], log.read_text()[-2000:])


def test_a_client_that_stops_reading_is_cut_off_and_its_response_stops_counting_against_the_budget() -> None:
    """One client asks for the dog's feature maps as JSON (about 7.5 MB) and reads none of it: its worker holds the
    answer, so another client's equal answer does not fit in the 10 MB budget for responses (503, Retry-After).
    Once the first client has taken nothing for the 3 s send timeout (looked at every 0.75 s), the server resets its
    connection, the answer is freed, and the other client's next try is answered in full; the first client gets
    only part of its answer."""
    with served(send_timeout_s="3", max_response_bytes_in_flight=str(10_000_000)) as (url, _, log):
        port = int(url.rsplit(":", 1)[1])
        files = {"image": ("dog.jpg", DOG.read_bytes())}
        spec = {"spec": json.dumps({"output": {"format": "json"}})}
        with httpx.Client(base_url=url, timeout=30) as client:
            whole = len(client.post("/v1/featuremaps", files=files, data=spec).content)
            assert whole > 7_000_000
            request = client.build_request("POST", "/v1/featuremaps", files=files, data=spec)
            head = "POST /v1/featuremaps HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + "".join(
                f"{name}: {value}\r\n" for name, value in request.headers.items() if name.lower() != "host"
            )
            with socket.socket() as stalled:
                stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
                stalled.settimeout(30)
                stalled.connect(("127.0.0.1", port))
                stalled.sendall(head.encode() + b"\r\n" + request.read())
                # Its answer has started (so it is held) before the other client asks: otherwise the other's answer
                # could be held first, for the moment it takes to send, and this one be the one refused.
                assert stalled.recv(12, socket.MSG_PEEK | socket.MSG_WAITALL) == b"HTTP/1.1 200"

                def until(status: int) -> httpx.Response:
                    deadline = time.monotonic() + 15
                    while (r := client.post("/v1/featuremaps", files=files, data=spec)).status_code != status:
                        if time.monotonic() > deadline:
                            break
                    return r

                refused = until(503)
                assert refused.status_code == 503, (refused.text[:300], log.read_text()[-2000:])
                assert refused.headers["retry-after"] == "1"
                assert "bytes of responses waiting to be sent" in refused.json()["detail"]
                served_whole = until(200)
                assert served_whole.status_code == 200 and len(served_whole.content) == whole
                taken = 0
                while True:
                    try:
                        chunk = stalled.recv(1 << 20)
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    taken += len(chunk)
                assert 0 < taken < whole
        assert "the client took none of the" in log.read_text()


@pytest.mark.parametrize("workers", ["1", None])
def test_sigterm_turns_readiness_off_and_lets_the_request_in_flight_finish(workers: str | None) -> None:
    """One process, and the default launch (a worker per usable CPU): every worker drains."""
    heavy = {"layers": [{"op": "conv", "filters": [{"kernel": [[0.001] * 31] * 31}] * 24, "padding": "same"}],
             "output": {"stages": [0], "format": "json"}}  # fmt: skip
    with served(workers, shutdown_delay_s="2", max_concurrency="4") as (url, proc, log):
        result: dict[str, object] = {}

        def slow() -> None:
            with httpx.Client(base_url=url, timeout=60) as client:
                files = {"image": ("dog.jpg", DOG.read_bytes())}
                result["r"] = client.post("/v1/featuremaps", files=files, data={"spec": json.dumps(heavy)})

        worker = threading.Thread(target=slow)
        worker.start()
        with httpx.Client(base_url=url, timeout=10) as client:  # SIGTERM once the request is computing
            deadline = time.monotonic() + 30
            while not re.search(r"^featuremap_compute_active [1-9]", client.get("/metrics").text, re.M):
                assert time.monotonic() < deadline and worker.is_alive(), "the heavy request never started computing"
                time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        with httpx.Client(base_url=url, timeout=10) as client:
            for _ in range(100):  # the signal is handled between the loop's events
                r = client.get("/readyz")
                if r.status_code == 503:
                    break
                time.sleep(0.01)
            assert r.status_code == 503 and r.json() == {"status": "stopping"}
            assert client.get("/healthz").status_code == 200  # still alive while draining
        worker.join(60)
        response = result["r"]
        assert isinstance(response, httpx.Response) and response.status_code == 200
        assert proc.wait(60) in (0, -signal.SIGTERM)
        completed = log.read_text().count("Application shutdown complete")
        assert completed == (1 if workers else default_workers()), log.read_text()[-2000:]


def test_the_default_launch_runs_a_worker_per_usable_cpu_each_with_its_share(tmp_path: Path) -> None:
    """`python -m service` without WEB_CONCURRENCY: one worker per usable CPU (at most 4), each with one compute
    slot per CPU it has; all answer predictions, and /metrics, whichever worker answers it, counts them all:
    the test makes sure at least two workers served some (each worker's counts are in its own file)."""
    if default_workers() < 2:
        pytest.skip("one usable CPU: the default is one worker")
    with served(None, {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}) as (url, proc, log):
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        workers = [pid for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == default_workers(), (children, log.read_text()[-2000:])
        digit = (ROOT / "service" / "samples" / "digit.png").read_bytes()
        key = _answered_key("POST", "/v1/predict")

        sent = 0
        for _ in range(40):  # each on a new connection, until two workers have answered some
            with httpx.Client(base_url=url, timeout=30) as client:
                r = client.post("/v1/predict", files={"image": ("digit.png", digit)})
            assert r.status_code == 200 and r.json()["label"] == 7
            sent += 1
            if sent >= 8 and sum(1 for n in _counts_by_worker(tmp_path, key).values() if n > 0) >= 2:
                break
        deadline = time.monotonic() + 10
        while True:  # a request is counted just after its answer is sent: the last one may not be yet
            by_worker = _counts_by_worker(tmp_path, key)
            if sum(by_worker.values()) == sent or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert sum(1 for n in by_worker.values() if n > 0) >= 2 and sum(by_worker.values()) == sent, by_worker
        pattern = re.compile(
            r'^featuremap_requests_total\{method="POST",route="/v1/predict",status="200"\} (\S+)$', re.M
        )
        for _ in range(6):  # new connections, so that different workers answer
            with httpx.Client(base_url=url, timeout=30) as client:
                text = client.get("/metrics").text
            counted = pattern.search(text)
            assert counted and float(counted.group(1)) == sent, (by_worker, text[:3000])
            assert re.search(r"^featuremap_compute_active \S+$", text, re.M), text[:3000]


@pytest.mark.parametrize("pin", ["true", "false"])
def test_each_worker_runs_on_a_cpu_of_its_own_with_its_compute_thread(pin: str) -> None:
    """The default launch, where this process's CPUs are all usable (no lower quota): a worker per CPU, each
    worker's event loop on a CPU of its own, a different one each, and its compute thread on the same CPU
    (`service.cpus.pin_worker`). FEATUREMAP_PIN_WORKERS=false leaves every thread free to run anywhere."""
    mask = os.sched_getaffinity(0)
    if default_workers() < 2 or len(mask) != default_workers() or usable_cpus() != len(mask):
        pytest.skip("needs one worker per CPU of the affinity mask, 2 at least, and no lower container quota")
    with served(None, pin_workers=pin) as (url, proc, log):
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        workers = [int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        # A JPEG: a lone small PNG would be predicted on the event loop (`predict.is_light`) and never start the
        # compute thread this test looks for.
        digit = encoded(Image.open(ROOT / "service" / "samples" / "digit.png"), "JPEG", quality=95)

        def cpus_of_threads(pid: int) -> dict[int, set[int]]:
            return {int(t.name): os.sched_getaffinity(int(t.name)) for t in Path(f"/proc/{pid}/task").iterdir()}

        # The threads each worker has before its first prediction (native ones among them, which torch or ONNX
        # Runtime may start pinned): the compute thread is the one a prediction adds.
        before = {pid: set(cpus_of_threads(pid)) for pid in workers}

        def started(pid: int) -> dict[int, set[int]]:
            return {tid: cpus for tid, cpus in cpus_of_threads(pid).items() if tid not in before[pid]}

        for _ in range(40):  # each on a new connection, until every worker has started its compute thread
            with httpx.Client(base_url=url, timeout=30) as client:
                assert client.post("/v1/predict", files={"image": ("digit.jpg", digit)}).json()["label"] == 7
            if all(started(pid) for pid in workers):
                break
        loops = [cpus_of_threads(pid)[pid] for pid in workers]  # each worker's main thread runs its event loop
        new = [started(pid) for pid in workers]
        assert all(new), new
        if pin == "true":
            assert sorted(cpu for cpus in loops for cpu in cpus) == sorted(mask), loops  # one each, all different
            assert all(cpus == loop for loop, threads in zip(loops, new, strict=True) for cpus in threads.values()), (
                loops,
                new,
            )
            assert log.read_text().count("this worker runs on CPU") == len(workers)
        else:
            assert all(cpus == mask for pid in workers for cpus in cpus_of_threads(pid).values()), loops
            assert "this worker runs on CPU" not in log.read_text()


def test_workers_take_turns_at_a_burst_of_new_connections(tmp_path: Path) -> None:
    """8 connections a worker waiting at once, each with its request, when the workers wake: every worker serves
    some of them. asyncio alone lets the first worker to wake accept every waiting connection in one go, and the
    server then runs at one worker's speed; `FairAcceptEventLoop` takes one per wake-up, and serves what it has
    read before it takes the next (tests/unit/test_serving.py shows the loop exactly, and that `python -m service`
    asks for it; this shows the server's workers serve with it).

    The burst is staged, not raced: the workers are stopped (SIGSTOP, each thread seen stopped) while the
    connections are opened and their requests sent; then each worker in turn is resumed alone until it has taken a
    connection from the accept queue, and for a millisecond more, and is stopped again; last, all are resumed. In
    that millisecond asyncio's own accept takes every connection left (its loop takes one in some microseconds: 16
    of 16 in 5 runs of 5), and the server's a few, as each turn of its loop also serves a request (4 to 6 of 16 in
    13 runs, 8 of them with both CPUs kept busy by other processes). The test's process watches the queue through a
    copy of the server's listening socket (TCP_INFO, one system call), from a CPU the worker is not pinned to, with
    its garbage collector off. It first read /proc/net/tcp, which lists every socket of the host: 4.6 ms a read
    while a benchmark ran.

    Opened to running workers, as this test first did, the burst was a race it did not control (16 to 0 in about 1
    run of 5); resuming the others beside the first once it had taken one, as it did next, was a race too: the first
    served all 16 before the second had run, in 1 CI run of some dozens."""
    if default_workers() < 2:
        pytest.skip("one usable CPU: the default is one worker")
    with served(None, {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}) as (url, proc, log):
        port = int(url.rsplit(":", 1)[1])
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        workers = [int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == default_workers(), children
        burst = 8 * len(workers)
        key = _answered_key("GET", "/healthz")
        before = _counts_by_worker(tmp_path, key)
        connections: list[socket.socket] = []
        own_cpus = os.sched_getaffinity(0)
        with _listening_socket(proc.pid, port) as listener:
            gc.disable()
            try:
                for pid in workers:
                    os.kill(pid, signal.SIGSTOP)
                for pid in workers:
                    _wait_stopped(pid)
                connections = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(burst)]
                for conn in connections:
                    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
                left = _accept_queue(listener)
                assert left == burst
                for i, pid in enumerate(workers):  # each alone, then stopped again
                    away = own_cpus - os.sched_getaffinity(pid)  # a pinned worker: watched from another CPU
                    os.sched_setaffinity(0, away or own_cpus)
                    os.kill(pid, signal.SIGCONT)
                    deadline = time.monotonic() + 10
                    while _accept_queue(listener) == left and time.monotonic() < deadline:
                        pass
                    until = time.perf_counter() + 0.001
                    while time.perf_counter() < until:  # (not sleep: this process must not wait for a CPU)
                        pass
                    os.kill(pid, signal.SIGSTOP)
                    _wait_stopped(pid)
                    left, took = _accept_queue(listener), left
                    assert left < took, f"worker {i + 1} of {len(workers)} took no connection in 10 s alone"
                    last = i == len(workers) - 1
                    assert left > 0 or last, f"worker {i + 1} took all {took} waiting connections in 1 ms alone"
            finally:
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                os.sched_setaffinity(0, own_cpus)
                gc.enable()
        try:
            for conn in connections:
                assert conn.recv(65536).startswith(b"HTTP/1.1 200 "), log.read_text()[-2000:]
        finally:
            for conn in connections:
                conn.close()
        deadline = time.monotonic() + 10
        while True:  # a request is counted just after its answer is sent
            after = _counts_by_worker(tmp_path, key)
            served_here = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
            if sum(served_here.values()) == burst or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert sum(served_here.values()) == burst, served_here
        assert len(served_here) == default_workers() and min(served_here.values()) >= 1, served_here


def _listening_socket(pid: int, port: int) -> socket.socket:
    """A copy (pidfd_getfd) of the socket process `pid` listens on at 127.0.0.1:`port`, found by its inode."""
    local = f"0100007F:{port:04X}"
    lines = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    inodes = [fields[9] for fields in lines if fields[1] == local and fields[3] == "0A"]  # LISTEN
    assert inodes, f"nothing listens on 127.0.0.1:{port}"
    fds = [fd for fd in Path(f"/proc/{pid}/fd").iterdir() if os.readlink(fd) == f"socket:[{inodes[0]}]"]
    assert fds, f"process {pid} does not hold the socket listening on 127.0.0.1:{port}"
    pidfd = os.pidfd_open(pid)
    try:
        copy = ctypes.CDLL(None, use_errno=True).syscall(_SYS_PIDFD_GETFD, pidfd, int(fds[0].name), 0)
    finally:
        os.close(pidfd)
    if copy < 0:
        raise OSError(ctypes.get_errno(), "pidfd_getfd")
    return socket.socket(fileno=copy)


_SYS_PIDFD_GETFD = 438  # the same number on every architecture (Linux 5.6 and later)


def _accept_queue(listener: socket.socket) -> int:
    """Connections waiting to be accepted on a listening TCP socket: TCP_INFO's `tcpi_unacked` (after 8 bytes of
    state and 4 other u32s), which Linux fills with a listening socket's accept queue."""
    return int(struct.unpack_from("=I", listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32), 24)[0])


def _wait_stopped(pid: int) -> None:
    """Until every thread of `pid` is stopped: SIGSTOP takes effect when each is next scheduled, and a worker
    still running would accept the first connections as they come."""
    deadline = time.monotonic() + 10
    while True:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # a thread that ended
                pass
        if all(state == "T" for state in states):
            return
        assert time.monotonic() < deadline, states
        time.sleep(0.001)


def _answered_key(method: str, route: str) -> str:
    """The key of `featuremap_requests_total{method, route, status="200"}` in the workers' metric files."""
    labels = ["method", "route", "status"]
    return mmap_key(
        "featuremap_requests", "featuremap_requests_total", labels, [method, route, "200"], "HTTP requests answered"
    )


def _counts_by_worker(directory: Path, key: str) -> dict[str, float]:
    counts = {}
    for db in directory.glob("counter_*.db"):
        values = {k: v for k, v, *_ in MmapedDict.read_all_values_from_file(str(db))}
        counts[db.stem.removeprefix("counter_")] = values.get(key, 0.0)
    return counts


def test_schemathesis_finds_no_5xx_and_no_response_off_schema(tmp_path: Path) -> None:
    with served(max_queue="64") as (url, _, _log):
        cmd = [
            str(Path(sys.executable).with_name("schemathesis")), "run", str(ROOT / "openapi" / "openapi.json"),
            "--url", url, "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance",
            "--phases", "examples,coverage,fuzzing", "--max-examples", "25", "--seed", "20261130",
            "--request-timeout", "30",
            "--report", "junit", "--report-dir", str(tmp_path),
        ]  # fmt: skip
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
