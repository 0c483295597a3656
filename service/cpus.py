"""How many CPUs this process may really use: its affinity mask, capped by a container's CPU quota (cgroup v2
`cpu.max`, or v1 `cpu.cfs_quota_us`). `os.cpu_count()` sees every core of the host, so a pod limited to 2 CPUs
on a 64-core node would start 64 torch threads and lose most of its time to oversubscription."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Where `python -m service` tells its workers to mark themselves ready (service.readiness), when it runs several.
READY_DIR_ENV = "FEATUREMAP_WORKER_READY_DIR"


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
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
