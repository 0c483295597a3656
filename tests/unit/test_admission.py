"""Compute threads run torch with the thread count they were set up with: OpenMP keeps the count per thread, so a
compute thread that never set it runs oneDNN's convolutions on a team of one thread per core, which the
service's thread budget (service.cpus) does not count. The work's outcome reaches its caller and frees its slot,
and is dropped quietly when nobody is left to take it. (Queueing and refusals: tests/api/test_robustness.py.) A byte
budget takes what fits, and one item alone."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from service import classifiers
from service.admission import Admission, ByteBudget
from service.cpus import usable_cpus
from service.errors import OverloadedError


def threads_in_process() -> set[int]:
    return {int(task.name) for task in Path("/proc/self/task").iterdir()}


def threads_made_by_a_forward_pass(thread_setup: functools.partial[None] | None) -> set[int]:
    """The ids of the threads this process gained, besides the compute thread itself, from running the CNN's module
    (torch's oneDNN convolutions, as the feature maps' pipeline runs them) on a new compute thread (listed on that
    thread, right after the pass). New thread ids, not the change in the count: a thread joined just before (the
    previous test's compute thread) can still be listed as it exits, and its going offset an OpenMP thread
    (a run of the tests once read 0 for the control)."""
    serving = classifiers.load_classifier("cnn").on(torch.device("cpu"))
    digits = torch.rand(16, 1, 28, 28)
    before = threads_in_process()
    admission = Admission(1, 1, 10, thread_setup)

    def forward() -> set[int]:
        with torch.inference_mode():
            serving(digits)
        return threads_in_process() - before - {threading.get_native_id()}

    try:
        return asyncio.run(admission.run(forward))
    finally:
        admission.close()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_a_compute_thread_set_up_with_one_torch_thread_starts_no_openmp_team() -> None:
    assert threads_made_by_a_forward_pass(functools.partial(torch.set_num_threads, 1)) == set()


@pytest.mark.skipif(
    not Path("/proc/self/task").is_dir() or usable_cpus() < 2 or os.environ.get("OMP_NUM_THREADS") == "1",
    reason="the control needs Linux, 2 or more CPUs and OpenMP's default team size",
)
def test_the_control_a_compute_thread_not_set_up_starts_a_team() -> None:
    """Without the set-up, the same pass leaves OpenMP's worker threads behind: what the first test rules out."""
    assert len(threads_made_by_a_forward_pass(None)) >= 1


@pytest.mark.parametrize(
    ("work", "expected"),
    [
        pytest.param(lambda: 42, 42, id="a result"),
        pytest.param(lambda: 1 // 0, ZeroDivisionError, id="the work's own exception"),
        pytest.param(lambda: next(iter([])), RuntimeError, id="StopIteration, which asyncio cannot carry"),
    ],
)
def test_the_work_s_outcome_reaches_its_caller_and_frees_the_slot(work: Callable[[], int], expected: object) -> None:
    async def scenario() -> None:
        admission = Admission(1, 0, 1)
        try:
            if isinstance(expected, type):
                with pytest.raises(expected):
                    await admission.run(work)
            else:
                assert await admission.run(work) == expected
            assert admission.active == 0
            assert await admission.run(lambda: "next") == "next"  # the one slot is free again
        finally:
            admission.close()

    asyncio.run(scenario())


def test_work_that_ends_after_its_event_loop_closed_is_dropped_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """A server that stops while a compute thread still works (its client gone, the loop closed) gets no error
    from the hand-back: there is nobody left to hand the outcome to."""
    started, gate = threading.Event(), threading.Event()
    admission = Admission(1, 0, 10)

    def work() -> bool:
        started.set()
        return gate.wait(10)

    async def scenario() -> None:
        request = asyncio.create_task(admission.run(work))
        while not (started.is_set() or request.done()):  # until the work runs on its thread
            await asyncio.sleep(0)
        assert started.is_set(), request
        request.cancel()

    asyncio.run(scenario())  # the loop closes while the work still runs
    with caplog.at_level(logging.DEBUG):
        gate.set()
        admission.close()  # waits for the work, whose hand-back finds the loop closed
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


# ByteBudget: (held before, size taken) -> held after, or None when refused (held unchanged).
BUDGET_CASES = [
    (0, 600, 600),
    (600, 400, 1_000),  # up to the limit exactly
    (600, 401, None),
    (1_000, 1, None),
    (0, 5_000, 5_000),  # one item over the limit fits while nothing else is held
    (1, 5_000, None),
]


@pytest.mark.parametrize(("held", "size", "after"), BUDGET_CASES)
def test_a_byte_budget_takes_what_fits_and_one_item_alone(held: int, size: int, after: int | None) -> None:
    budget = ByteBudget(1_000, "responses waiting to be sent", "responses")
    budget.held = held
    if after is None:
        with pytest.raises(OverloadedError) as refused:
            budget.take(size)
        assert budget.held == held
        assert str(refused.value) == (
            f"this worker holds {held:,} bytes of responses waiting to be sent, the most it holds at once is 1,000; "
            f"{size:,} more would not fit; retry shortly"
        )
        assert refused.value.retry_after == 1
    else:
        budget.take(size)
        assert budget.held == after
        budget.give_back(size)
        assert budget.held == held
