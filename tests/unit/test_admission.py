"""Compute threads run torch with the thread count they were set up with: OpenMP keeps the count per thread, so a
compute thread that never set it runs oneDNN's convolutions on a team of one thread per core, which the
service's thread budget (service.cpus) does not count."""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path

import pytest
import torch

from service import classifiers
from service.admission import Admission
from service.cpus import usable_cpus


def threads_in_process() -> int:
    return len(list(Path("/proc/self/task").iterdir()))


def threads_made_by_a_forward_pass(thread_setup: functools.partial[None] | None) -> int:
    """Threads this process gained, besides the compute thread itself, from running the CNN's oneDNN path on a
    new compute thread (counted on that thread, right after the pass)."""
    serving = classifiers.load_classifier("cnn").serving(torch.device("cpu"))
    digits = torch.rand(16, 1, 28, 28)
    before = threads_in_process()
    admission = Admission(1, 1, 10, thread_setup)

    def forward() -> int:
        with torch.inference_mode():
            serving(digits)
        return threads_in_process()

    try:
        return asyncio.run(admission.run(forward)) - before - 1
    finally:
        admission.close()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_a_compute_thread_set_up_with_one_torch_thread_starts_no_openmp_team() -> None:
    assert threads_made_by_a_forward_pass(functools.partial(torch.set_num_threads, 1)) == 0


@pytest.mark.skipif(
    not Path("/proc/self/task").is_dir() or usable_cpus() < 2 or os.environ.get("OMP_NUM_THREADS") == "1",
    reason="the control needs Linux, 2 or more CPUs and OpenMP's default team size",
)
def test_the_control_a_compute_thread_not_set_up_starts_a_team() -> None:
    """Without the set-up, the same pass leaves OpenMP's worker threads behind: what the first test rules out."""
    assert threads_made_by_a_forward_pass(None) >= 1
