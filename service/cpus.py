"""How many CPUs this process may really use: its affinity mask, capped by a container's CPU quota (cgroup v2
`cpu.max`, or v1 `cpu.cfs_quota_us`). `os.cpu_count()` sees every core of the host, so a pod limited to 2 CPUs
on a 64-core node would start 64 torch threads and lose most of its time to oversubscription. Also the default
worker and torch thread counts that follow from it, and `pin_worker`, which gives each worker a CPU of its own."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Where `python -m service` tells its workers to mark themselves ready (service.readiness), when it runs several.
READY_DIR_ENV = "FEATUREMAP_WORKER_READY_DIR"
_unpinned: set[int] = set()  # when this worker was pinned to a CPU (`pin_worker`): the CPUs it had before


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    try:
        cpus = len(_unpinned or os.sched_getaffinity(0))  # the process's CPUs, not just a pinned thread's one
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cpu_quota(cgroup_root)
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def _cpu_quota(root: Path) -> float | None:
    """CPUs' worth of time per period the cgroup allows, or None when unlimited or unknown."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu"
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        return None if quota_us <= 0 else quota_us / int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None


def worker_processes() -> int:
    """How many server processes share the CPUs: uvicorn's `WEB_CONCURRENCY` (which `python -m service` sets
    for its workers, whether it came from the environment or `--workers`); 1 when unset or not a number."""
    try:
        return max(1, int(os.environ.get("WEB_CONCURRENCY", "1")))
    except ValueError:
        return 1


def threads_per_slot(slots: int) -> int:
    """torch threads for each of a process's `slots` compute threads, so that all the workers' slots together use
    each usable CPU once: more threads than cores make OpenMP's spinning threads fight (a 2-worker server on 2
    cores with 2 threads a slot served 86 req/s against 514 for one worker)."""
    return max(1, usable_cpus() // (slots * worker_processes()))


MAX_DEFAULT_WORKERS = 4  # each worker holds its own torch and models (about 330 MiB): more only when asked


def default_workers() -> int:
    """One server process per usable CPU, up to 4. A process's event loop, not torch, is what saturates first
    when serving small predictions: on 2 cores, 2 workers of 1 compute slot served 1,067 req/s where 1 worker
    of 2 slots served 465 (bench/serve.py)."""
    return min(usable_cpus(), MAX_DEFAULT_WORKERS)


# Where `python -m service` lets its workers claim a CPU each (`pin_worker`), when it runs several.
CPU_CLAIMS_ENV = "FEATUREMAP_WORKER_CPU_DIR"
_claimed: list[int] = []  # the open, locked claim file of this process: held until it exits


def pin_worker(claims: Path, workers: int, cpus_per_worker: int) -> int | None:
    """Run this worker's event loop, and the compute threads it starts later, on one CPU of its own.

    At one request at a time the loop and the compute thread take turns, and the scheduler puts each on
    whichever CPU is idle: every hand-over then wakes the other CPU, and each side finds caches the other CPU
    warmed. On one CPU a lone client's prediction took 2.0 against 2.5 ms (p50; 2 workers on 2 cores,
    bench/serve.py; 16 clients were served as fast, 1,707 against 1,662 req/s). What it gives up: a worker
    cannot borrow an idle CPU when clients' connections are unevenly shared between the workers (accepts take
    turns, see `service.serving`).

    Only when the CPUs are this server's to share out: one worker per CPU of this process's affinity mask, no
    container quota below it (a quota-limited container's CPUs are shared with others), and one torch thread per
    worker. A worker claims the lowest free CPU by locking a file in `claims` (the lock goes with the process,
    so a restarted worker takes its predecessor's CPU). Returns the CPU, or None where nothing was pinned."""
    try:
        mask = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not on Linux
        return None
    if _claimed or workers < 2 or len(mask) != workers or usable_cpus() != workers or cpus_per_worker != 1:
        return None
    import fcntl  # POSIX only, as sched_getaffinity

    for cpu in sorted(mask):
        fd = os.open(claims / f"cpu{cpu}", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _claimed.append(fd)
        _unpinned.update(mask)
        os.sched_setaffinity(0, {cpu})  # this thread; the threads it starts from now on inherit it
        return cpu
    return None


def unpin_thread() -> None:
    """Let the calling thread run on any of the process's CPUs again (threads that work in parallel, such as
    PNG encoders, which a pinned worker's compute thread starts); nothing when the worker was not pinned."""
    if _unpinned:
        os.sched_setaffinity(0, _unpinned)
