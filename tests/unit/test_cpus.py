"""usable_cpus: the affinity mask, capped by a container's CPU quota (cgroup v2 and v1), read from fake trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.__main__ import main as service_main
from service.cpus import threads_per_slot, usable_cpus, worker_processes

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
