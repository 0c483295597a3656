"""The C allocator's settings for a worker process: large buffers are reused, not handed back to the kernel after
every request and faulted in again on the next.

glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh `mmap`s and unmaps them on free, and
gives each thread that allocates under contention an arena of its own, trimmed as it empties. A feature-map
request allocates hundreds of MB in such buffers (a 1024x1024 RGB image through 16 filters: 64 MB per stage), so
every request paid about 85,000 page faults, each a trip through the hypervisor on a VM: the JSON-tensor case took
425 ms, of which about 140 ms went to faulting memory in. With one arena, no mmaps and a 256 MiB trim threshold it
took 280-300 ms, on a compute thread as on the main one, with about no faults.

Where it is set: `python -m service` puts `GLIBC_TUNABLES` in its workers' environment, so that glibc applies it
as each starts, before any thread allocates; `tune_allocator` (from `create_app`) does the same with mallopt(3) in
a process that started without it. Only the former is sure: glibc fixes its arena limit the first time a second
thread allocates, and a spawned worker's threads had done so before its app was made (it still paid about 65,000
faults a request; with the variable, a few once each worker had served a few requests).

What it costs: memory freed below the top of the heap stays with the process for reuse, up to what the largest
requests needed at once (which the service's limits bound); free memory above the trim threshold at the top of
the heap is still returned. The predict path, with its small allocations, measured the same (16 clients: 1.07x
the throughput, 5 rounds of 6; 1 client: 1.03x the p50, within noise).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt(3) parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

TRIM_THRESHOLD = 256 * 1024 * 1024  # free memory at the heap's top beyond this goes back to the kernel
# The same settings as glibc's tunables, read when a process starts (for the workers `python -m service` spawns).
GLIBC_TUNABLES = f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"


@functools.cache
def tune_allocator() -> bool:
    """Apply the settings above to this process (once); False where the C library is not glibc (nothing done).
    Call it early in the process, before other threads allocate: an arena made before it stays in use."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  # glibc's own symbol: musl and others lack it
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(
        mallopt(param, value) == 1
        for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    )
