"""Metrics across worker processes: what a worker that was killed leaves in /metrics."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from service.admission import Admission
from service.observability import Metrics

ROOT = Path(__file__).resolve().parents[2]

# A worker's metrics as `python -m service` makes them: requests in flight, then either killed (os._exit: no
# clean stop, so no `mark_process_dead`) or kept running until the test closes its stdin.
WORKER = """
import os, sys
from service.admission import Admission
from service.observability import Metrics
metrics = Metrics(Admission(1, 1, 1.0))
metrics.in_flight.inc(int(sys.argv[1]))
metrics.observe("POST", "/v1/predict", 200, 0.001)
print(os.getpid(), flush=True)
if sys.argv[2] == "killed":
    os._exit(0)
sys.stdin.read()
"""


def _worker(directory: Path, in_flight: int, fate: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(in_flight), fate],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _value(text: str, sample: str) -> float:
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    assert found, text
    return float(found.group(1))


def _in_flight(directory: Path) -> float:
    """What /metrics reports for requests in flight, read from the workers' files as any worker reads them."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(directory))  # type: ignore[no-untyped-call]  # untyped upstream
    return _value(generate_latest(registry).decode(), "featuremap_requests_in_flight")


def test_a_starting_worker_takes_a_killed_workers_gauges_out_of_the_sums(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed with requests in flight leaves them in the sum; the worker started in its place (as
    uvicorn starts one for each that dies) takes them out, and keeps the killed worker's counts."""
    with _worker(tmp_path, 3, "killed") as killed:
        killed_pid = int(killed.communicate(timeout=60)[0])
    assert (tmp_path / f"gauge_livesum_{killed_pid}.db").exists()
    assert _in_flight(tmp_path) == 3  # what a killed worker left behind

    with _worker(tmp_path, 2, "running") as running:
        try:
            assert running.stdout is not None
            running_pid = int(running.stdout.readline())
            assert not (tmp_path / f"gauge_livesum_{killed_pid}.db").exists()
            assert (tmp_path / f"gauge_livesum_{running_pid}.db").exists()
            assert _in_flight(tmp_path) == 2  # the running worker's own; 5 with the killed one's

            monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
            text = Metrics(Admission(1, 1, 1.0)).exposition().decode()
            assert _value(text, "featuremap_requests_in_flight") == 2  # a worker that exists keeps its gauges
            assert _value(text, 'featuremap_requests_total{method="POST",route="/v1/predict",status="200"}') == 2
        finally:
            running.communicate(timeout=60)
