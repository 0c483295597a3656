"""Micro-batching: concurrent items share batches, each gets its own result in order, a bad one fails alone."""

from __future__ import annotations

import asyncio
import threading

import pytest

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
