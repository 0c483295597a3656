"""usable_cpus: the affinity mask, capped by a container's CPU quota (cgroup v2 and v1), read from fake trees;
the default worker and thread counts; and pin_worker, which gives each worker a CPU of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service import cpus
from service.__main__ import main as service_main
from service.cpus import threads_per_slot, usable_cpus, worker_processes
from tests.conftest import ROOT

HOST = len(os.sched_getaffinity(0))
USABLE = usable_cpus()  # this machine's, its cgroup quota included


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, HOST),  # no cgroup files: the affinity mask
        ({"cpu.max": "max 100000\n"}, HOST),  # v2, unlimited
        ({"cpu.max": "100000 100000\n"}, 1),  # v2, one CPU
        ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU still gets one thread
        ({"cpu.max": "150000 100000\n"}, min(2, HOST)),  # 1.5 CPUs round up
        ({"cpu.max": "6400000 100000\n"}, HOST),  # a quota above the mask does not add cores
        ({"cpu.max": "garbage\n"}, HOST),  # unreadable: ignored
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, HOST),  # v1, unlimited
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1, one CPU
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "0\n"}, HOST),  # nonsense: ignored
    ],
)
def test_usable_cpus_respects_the_container_quota(tmp_path: Path, files: dict[str, str], expected: int) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert usable_cpus(tmp_path) == expected


def test_usable_cpus_on_this_machine_is_within_the_host() -> None:
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("workers", "slots", "expected"),
    [
        ("1", 1, USABLE),
        ("1", 2, max(1, USABLE // 2)),
        (str(USABLE), 1, 1),
        ("64", 4, 1),
        ("nonsense", 1, USABLE),
        ("0", 1, USABLE),
    ],
)
def test_torch_threads_are_shared_among_all_workers_slots(
    monkeypatch: pytest.MonkeyPatch, workers: str, slots: int, expected: int
) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", workers)
    assert threads_per_slot(slots) == expected
    assert worker_processes() >= 1


@pytest.mark.parametrize(("given", "says"), [("0", "at least 1"), ("-2", "at least 1"), ("two", "not a whole number")])
def test_a_bad_worker_count_is_refused_with_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], given: str, says: str
) -> None:
    for argv, env in ((["--workers", given], None), ([], given)):  # the flag, and WEB_CONCURRENCY
        if env is None:
            monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
        else:
            monkeypatch.setenv("WEB_CONCURRENCY", env)
        with pytest.raises(SystemExit) as exited:
            service_main(argv)
        assert exited.value.code == 2 and says in capsys.readouterr().err


# --- pin_worker: a CPU of its own for each worker ----------------------------------------------------------------

MASK = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
CLAIMANT = """
import json, os, sys, threading
from pathlib import Path
from service.cpus import pin_worker, unpin_thread, usable_cpus
cpu = pin_worker(Path(sys.argv[1]), int(sys.argv[2]), 1)
again = pin_worker(Path(sys.argv[1]), int(sys.argv[2]), 1)  # a second claim by the same process takes nothing
seen = {}
def started_later(name, unpin):
    if unpin:
        unpin_thread()
    seen[name] = sorted(os.sched_getaffinity(0))
for name, unpin in (("thread", False), ("unpinned thread", True)):
    t = threading.Thread(target=started_later, args=(name, unpin))
    t.start()
    t.join()
mine = sorted(os.sched_getaffinity(0))
print(json.dumps({"cpu": cpu, "again": again, "main": mine, "usable": usable_cpus(), **seen}), flush=True)
sys.stdin.read()  # holds its claim until the test closes stdin
"""


def _claimant(claims: Path, workers: int) -> tuple[subprocess.Popen[str], dict[str, object]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CLAIMANT, str(claims), str(workers)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


@pytest.mark.skipif(len(MASK) < 2 or usable_cpus() != len(MASK), reason="needs 2+ CPUs of its own, no lower quota")
def test_workers_claim_a_cpu_each_and_a_restarted_worker_takes_the_freed_one(tmp_path: Path) -> None:
    """As many workers as CPUs: each runs on its own one, with the threads it starts later (PNG encoders widen
    themselves again), and still counts all the CPUs as usable (the PNG encoders' pool is sized by it: pinned,
    it had one thread, and a 1024x1024 request's maps took 2.6 against 1.5 s); one more claims nothing; when one
    exits, its successor gets its CPU."""
    workers = len(MASK)
    procs = []
    try:
        claims = []
        for _ in range(workers):
            proc, seen = _claimant(tmp_path, workers)
            procs.append(proc)
            cpu = seen["cpu"]
            assert seen["main"] == seen["thread"] == [cpu] and seen["unpinned thread"] == MASK, seen
            assert seen["again"] is None and seen["usable"] == workers, seen
            claims.append(cpu)
        assert sorted(claims) == MASK  # the lowest free one each time: all of them, once each
        extra, seen = _claimant(tmp_path, workers)
        procs.append(extra)
        assert seen["cpu"] is None and seen["main"] == seen["thread"] == MASK, seen
        procs[0].communicate("")  # the first worker exits: its lock goes with it
        successor, seen = _claimant(tmp_path, workers)
        procs.append(successor)
        assert seen["cpu"] == claims[0] and seen["main"] == [claims[0]], seen
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.communicate("")


@pytest.mark.parametrize(
    ("mask", "usable", "workers", "cpus_per_worker"),
    [
        ({0, 1}, 2, 1, 1),  # one worker: it has every CPU to itself already
        ({0, 1, 2, 3}, 4, 2, 1),  # fewer workers than CPUs: each may use more than one
        ({0, 1}, 2, 4, 1),  # more workers than CPUs
        ({0, 1}, 1, 2, 1),  # a container quota of 1 CPU on a 2-CPU mask: the CPUs are shared with others
        ({0, 1}, 2, 2, 2),  # two compute slots (or torch threads) a worker: they would share one CPU
    ],
)
def test_no_worker_is_pinned_unless_the_cpus_are_the_server_s_to_share_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mask: set[int], usable: int, workers: int, cpus_per_worker: int
) -> None:
    pinned: list[set[int]] = []
    monkeypatch.setattr(cpus, "_claimed", [])  # as in a fresh worker (the control case below pins from the same)
    monkeypatch.setattr(cpus, "_unpinned", set())
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(mask), raising=False)
    monkeypatch.setattr(os, "sched_setaffinity", lambda _, chosen: pinned.append(set(chosen)), raising=False)
    monkeypatch.setattr(cpus, "usable_cpus", lambda: usable)
    assert cpus.pin_worker(tmp_path, workers, cpus_per_worker) is None
    assert pinned == [] and list(tmp_path.iterdir()) == []  # nothing set, nothing claimed
    cpus.unpin_thread()  # and nothing to undo
    assert pinned == []


def test_the_control_case_pins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every condition met (each case of the table above breaks at least one): a CPU is claimed, the lowest."""
    pinned: list[set[int]] = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {2, 3}, raising=False)
    monkeypatch.setattr(os, "sched_setaffinity", lambda _, chosen: pinned.append(set(chosen)), raising=False)
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 2)
    monkeypatch.setattr(cpus, "_claimed", [])
    monkeypatch.setattr(cpus, "_unpinned", set())
    try:
        assert cpus.pin_worker(tmp_path, 2, 1) == 2
        assert pinned == [{2}] and (tmp_path / "cpu2").exists()
        cpus.unpin_thread()
        assert pinned == [{2}, {2, 3}]
    finally:
        for fd in cpus._claimed:
            os.close(fd)
