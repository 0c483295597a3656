"""Dynamic micro-batching: requests for the same model and device that arrive while one batch computes are
run together as the next batch, up to `max_size`. Nothing waits for a batch to fill: a lone request runs at
once, so batching costs no latency at low load and saves per-call overhead at high load.

Each item's outcome is its own: `run_batch` returns one result or one exception per item, in order, so a bad
input fails only its own request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from service.admission import Admission
from service.errors import OverloadedError

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    def __init__(
        self,
        run_batch: Callable[[list[Item]], list[Result | Exception]],
        admission: Admission,
        max_size: int,
        max_pending: int,
    ) -> None:
        self.run_batch = run_batch
        self.admission = admission
        self.max_size = max_size
        self.max_pending = max_pending  # items waiting per key before new ones are refused (503)
        self._pending: dict[Hashable, deque[tuple[Item, asyncio.Future[Result]]]] = {}
        self._workers: dict[Hashable, asyncio.Task[None]] = {}
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent batch sizes, for tests and tuning

    async def submit(self, key: Hashable, item: Item) -> Result:
        """Run `item` in the next batch for `key`; its own result, or its own exception."""
        queue = self._pending.setdefault(key, deque())
        if len(queue) >= self.max_pending:
            raise OverloadedError(
                f"{len(queue)} predictions are already waiting for this model; retry shortly", "batch_queue_full"
            )
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        queue.append((item, future))
        if key not in self._workers:
            self._workers[key] = asyncio.create_task(self._drain(key))
        return await future

    async def _drain(self, key: Hashable) -> None:
        queue = self._pending[key]
        try:
            while queue:
                batch = [queue.popleft() for _ in range(min(self.max_size, len(queue)))]
                live = [(item, fut) for item, fut in batch if not fut.done()]  # skip clients that hung up
                if not live:
                    continue
                self.batch_sizes.append(len(live))
                try:
                    results = await self.admission.run(self.run_batch, [item for item, _ in live])
                except Exception as e:  # the whole batch failed (overload, a bug): each request hears of it
                    results = [e] * len(live)
                for (_, fut), result in zip(live, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(result, Exception):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        finally:
            del self._workers[key]
            task = asyncio.current_task()
            if queue and not (task and task.cancelling()):  # items that came while this worker was ending
                self._workers[key] = asyncio.create_task(self._drain(key))
