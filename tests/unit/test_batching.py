"""Micro-batching: concurrent items share batches, each gets its own result in order, a bad one fails alone."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable

import pytest

from service import batching
from service.admission import Admission
from service.batching import MicroBatcher
from service.errors import OverloadedError


def test_items_that_arrive_during_a_batch_form_the_next_one() -> None:
    gate = threading.Event()
    seen: list[list[int]] = []

    def run_batch(items: list[int]) -> list[int | Exception]:
        if items == [0]:
            gate.wait(10)  # the first batch holds the only compute slot while the rest arrive
        seen.append(items)
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    async def scenario() -> None:
        admission = Admission(limit=1, queue=4, wait_s=10)
        batcher: MicroBatcher[int, int] = MicroBatcher(run_batch, admission, max_size=4, max_pending=100)
        first = asyncio.create_task(batcher.submit("m", 0))
        await asyncio.sleep(0.05)
        items = [1, 2, -3, 4, 5, 6]
        rest = [asyncio.create_task(batcher.submit("m", i)) for i in items]
        other = asyncio.create_task(batcher.submit("another model", 7))
        await asyncio.sleep(0.05)
        gate.set()
        assert await first == 0
        outcomes = await asyncio.gather(*rest, return_exceptions=True)
        assert outcomes[:2] == [10, 20] and outcomes[3:] == [40, 50, 60]
        assert isinstance(outcomes[2], ValueError) and str(outcomes[2]) == "bad -3"  # fails alone
        assert await other == 70
        assert [0] in seen and [1, 2, -3, 4] in seen and [5, 6] in seen and [7] in seen  # in arrival order
        assert max(batcher.batch_sizes) == 4
        admission.close()

    asyncio.run(scenario())


def test_a_full_batch_queue_refuses_new_items() -> None:
    gate = threading.Event()

    async def scenario() -> None:
        admission = Admission(limit=1, queue=4, wait_s=10)
        batcher: MicroBatcher[int, int] = MicroBatcher(
            lambda items: [gate.wait(10) and i for i in items], admission, 2, 2
        )
        tasks = [asyncio.create_task(batcher.submit("m", 0))]
        await asyncio.sleep(0.05)  # item 0 is computing (held by the gate)
        tasks += [asyncio.create_task(batcher.submit("m", i)) for i in (1, 2)]
        await asyncio.sleep(0.05)  # items 1 and 2 wait: the most allowed
        with pytest.raises(OverloadedError, match="already waiting") as refused:
            await batcher.submit("m", 99)
        assert refused.value.reason == "batch_queue_full"
        gate.set()
        assert await asyncio.gather(*tasks) == [0, 1, 2]
        admission.close()

    asyncio.run(scenario())


def _recording(seen: list[list[int]]) -> Callable[[list[int]], list[int | Exception]]:
    """A batch function that records each batch it runs and answers ten times each item."""

    def run_batch(items: list[int]) -> list[int | Exception]:
        seen.append(items)
        return [i * 10 for i in items]

    return run_batch


async def _spin(turns: int) -> None:
    """`turns` turns of the loop, one step each: the loop has something ready all along."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def _after_turns(turns: int, then: Awaitable[int]) -> int:
    """A request the loop is still reading: it reaches the batcher `turns` turns of the loop from now."""
    await _spin(turns)
    return await then


@pytest.mark.parametrize("fallback", [False, True], ids=["ready queue", "no ready queue"])
def test_requests_still_being_read_when_the_first_arrives_join_its_batch(
    fallback: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six requests reach the batcher over six turns of the event loop (as requests read over several turns do):
    one batch, not the first alone and the rest after it. A loop whose ready queue cannot be seen waits
    `FALLBACK_TURNS` turns: the requests within them join."""
    if fallback:
        monkeypatch.setattr(batching, "ready_queue", lambda loop: None)
    seen: list[list[int]] = []

    async def scenario() -> None:
        admission = Admission(limit=1, queue=4, wait_s=10)
        batcher: MicroBatcher[int, int] = MicroBatcher(_recording(seen), admission, max_size=16, max_pending=100)
        count = 6 if not fallback else batching.FALLBACK_TURNS
        requests = asyncio.gather(*(_after_turns(i, batcher.submit("m", i)) for i in range(count)))
        results = await asyncio.wait_for(requests, 10)  # a batch never cut fails here, not hangs
        assert results == [i * 10 for i in range(count)]
        assert seen == [list(range(count))]
        admission.close()

    asyncio.run(scenario())


def test_a_loop_that_is_never_idle_still_gets_its_batches_and_a_full_one_goes_at_once() -> None:
    """Another task keeps the loop busy every turn: a batch is cut after `IDLE_TURNS` turns, not never; and a batch
    already full is cut at once. Turns are counted up to the cut (the batch runs inline here: no thread timing)."""
    seen: list[list[int]] = []
    turns = 0
    cut_at: list[int] = []

    class InlineAdmission:
        async def run(
            self, fn: Callable[[list[int]], list[int | Exception]], items: list[int]
        ) -> list[int | Exception]:
            cut_at.append(turns)
            return fn(items)

    async def busy() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    async def scenario() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(_recording(seen), InlineAdmission(), max_size=2, max_pending=100)  # type: ignore[arg-type]
        spinner = asyncio.create_task(busy())
        await asyncio.sleep(0)
        start = turns
        assert await asyncio.wait_for(batcher.submit("m", 1), 10) == 10
        assert batching.IDLE_TURNS <= cut_at[0] - start <= batching.IDLE_TURNS + 3, cut_at[0] - start
        start = turns
        assert await asyncio.wait_for(asyncio.gather(batcher.submit("m", 2), batcher.submit("m", 3)), 10) == [20, 30]
        assert cut_at[1] - start <= 3, cut_at[1] - start  # full: cut without waiting for the loop
        assert seen == [[1], [2, 3]]
        spinner.cancel()

    asyncio.run(scenario())


class Refused(Exception):
    """What the `inline` check below raises for item -1."""


def _inline_check(item: int) -> bool:
    if item < 0:
        raise Refused(f"no inline for {item}")
    return item % 2 == 0  # even items may run on the loop


@pytest.mark.parametrize(
    ("inline", "busy", "items", "on_loop"),
    [
        (None, False, [2], False),  # no check given: always a compute thread
        (_inline_check, False, [2], True),  # a lone item the check accepts, nothing computing: the loop
        (_inline_check, False, [3], False),  # the check refuses it
        (_inline_check, True, [2], False),  # another batch holds the compute slot
        (_inline_check, False, [2, 4], False),  # both accepted, but a batch of two: a compute thread
        (_inline_check, False, [3, 4], False),  # 4 is accepted, but joins 3 in its batch
    ],
    ids=["no check", "lone and accepted", "refused", "compute busy", "two items", "joins a refused item"],
)
def test_a_lone_item_that_inline_accepts_runs_on_the_loop_while_no_compute_runs(
    inline: Callable[[int], bool] | None, busy: bool, items: list[int], on_loop: bool
) -> None:
    threads: dict[int, int] = {}
    gate = threading.Event()

    def run_batch(batch: list[int]) -> list[int | Exception]:
        for i in batch:
            threads[i] = threading.get_ident()
        if batch == [99]:
            gate.wait(10)
        return [i * 10 for i in batch]

    async def scenario() -> None:
        admission = Admission(limit=1, queue=4, wait_s=10)
        batcher: MicroBatcher[int, int] = MicroBatcher(run_batch, admission, 16, 100, inline)
        holder = asyncio.create_task(admission.run(run_batch, [99])) if busy else None
        await asyncio.sleep(0)  # one turn: the holder (when busy) takes the only slot
        assert admission.idle is not busy
        submitted = asyncio.gather(*(batcher.submit("m", i) for i in items))
        if holder is not None:
            for _ in range(1000):  # until the batch is cut and waits for the holder's slot (a turn or two)
                if admission.waiting:
                    break
                await asyncio.sleep(0)
            gate.set()
        assert await asyncio.wait_for(submitted, 10) == [i * 10 for i in items]
        assert [threads[i] == threading.get_ident() for i in items] == [on_loop] * len(items)
        assert list(batcher.batch_sizes) == [len(items)]  # one batch either way, in order
        if holder is not None:
            assert await holder == [990]
        admission.close()

    asyncio.run(scenario())


def test_an_item_is_judged_lone_once_the_loop_has_read_the_requests_that_came_with_it() -> None:
    """As in the server: item 0's request is the only one in flight as it reaches the batcher, while five more have
    come in and are read over the next turns of the loop. Judged when the batch is cut, not as item 0 arrives, none
    is lone: the six share a batch on a compute thread, rather than item 0 running on the loop while the others
    wait (under 16 clients, that ran every request on the loop, one at a time)."""
    in_flight = 0
    threads: dict[int, int] = {}

    def run_batch(batch: list[int]) -> list[int | Exception]:
        threads.update((i, threading.get_ident()) for i in batch)
        return [i * 10 for i in batch]

    async def request(i: int, turns: int, batcher: MicroBatcher[int, int]) -> int:
        nonlocal in_flight
        for _ in range(turns):  # not yet read from its connection
            await asyncio.sleep(0)
        in_flight += 1
        try:
            return await _after_turns(turns, batcher.submit("m", i))  # its body is read over a few turns
        finally:
            in_flight -= 1

    async def scenario() -> None:
        admission = Admission(limit=1, queue=4, wait_s=10)
        batcher: MicroBatcher[int, int] = MicroBatcher(run_batch, admission, 16, 100, lambda i: in_flight == 1)
        requests = asyncio.gather(*(request(i, min(i, 1), batcher) for i in range(6)))
        assert await asyncio.wait_for(requests, 10) == [i * 10 for i in range(6)]
        assert list(batcher.batch_sizes) == [6]
        assert threading.get_ident() not in threads.values()
        assert await asyncio.wait_for(request(6, 0, batcher), 10) == 60  # now lone: on the loop
        assert threads[6] == threading.get_ident()
        admission.close()

    asyncio.run(scenario())


def test_an_inline_item_fails_alone_and_the_batcher_goes_on() -> None:
    """The inline check raising, the batch function raising on the loop, or its answer for the item being an
    exception (a client's bad input), fails that item's request only."""

    def run_batch(batch: list[int]) -> list[int | Exception]:
        if batch == [4]:
            raise RuntimeError("a bug in the batch function")
        return [ValueError(f"bad {i}") if i == 6 else i * 10 for i in batch]

    async def scenario() -> None:
        admission = Admission(limit=1, queue=4, wait_s=10)
        batcher: MicroBatcher[int, int] = MicroBatcher(run_batch, admission, 16, 100, _inline_check)
        with pytest.raises(Refused, match="no inline for -1"):
            await asyncio.wait_for(batcher.submit("m", -1), 10)
        with pytest.raises(RuntimeError, match="a bug"):
            await asyncio.wait_for(batcher.submit("m", 4), 10)
        with pytest.raises(ValueError, match="bad 6"):
            await asyncio.wait_for(batcher.submit("m", 6), 10)
        assert await asyncio.wait_for(batcher.submit("m", 2), 10) == 20
        assert admission.idle
        admission.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("stage", ["computing", "waiting for the loop", "before it first ran"])
def test_a_cancelled_batch_worker_cancels_its_requests_and_a_new_one_serves_the_next(stage: str) -> None:
    """The batch worker cancelled (as when the loop closes) while its batch computes, while it lets the loop run
    before cutting one, or before its first step (so its own code never runs): every request it held, the batch's
    and those queued behind it, is cancelled rather than left waiting for ever, and the next item gets a new
    worker."""
    gate = threading.Event()

    def run_batch(items: list[int]) -> list[int | Exception]:
        if 0 in items:
            gate.wait(10)
        return [i * 10 for i in items]

    async def scenario() -> None:
        admission = Admission(limit=1, queue=4, wait_s=10)
        batcher: MicroBatcher[int, int] = MicroBatcher(run_batch, admission, max_size=4, max_pending=100)
        held = [asyncio.create_task(batcher.submit("m", i)) for i in (0, 1)]
        if stage == "computing":
            for _ in range(1000):  # until items 0 and 1 hold the compute slot
                await asyncio.sleep(0)
                if admission.active:
                    break
            held.append(asyncio.create_task(batcher.submit("m", 2)))  # queued behind them
            await asyncio.sleep(0)
            assert admission.active == 1 and len(batcher._pending["m"]) == 1
        elif stage == "before it first ran":
            await asyncio.sleep(0)  # both items queued; the worker they started is scheduled, not yet run
            drain = batcher._workers["m"].get_coro()
            assert len(batcher._pending["m"]) == 2 and inspect.getcoroutinestate(drain) == inspect.CORO_CREATED
        else:
            busy = asyncio.create_task(_spin(batching.IDLE_TURNS))  # so the worker waits rather than cut a batch
            for _ in range(3):  # the items are queued, the worker starts and lets the loop turn
                await asyncio.sleep(0)
            assert not admission.active and len(batcher._pending["m"]) == 2
            busy.cancel()
        worker = batcher._workers["m"]
        worker.cancel()
        outcomes = await asyncio.wait_for(asyncio.gather(*held, return_exceptions=True), 10)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
        assert worker.cancelled() and "m" not in batcher._workers
        gate.set()
        assert await asyncio.wait_for(batcher.submit("m", 5), 10) == 50
        admission.close()

    asyncio.run(scenario())
