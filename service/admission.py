"""Admission control for compute: at most `limit` requests run at once, at most `queue` wait, each for at most
`wait_s`; beyond that the request is refused at once (backpressure, not collapse)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from service.errors import OverloadedError


class Admission:
    """Counts are read by /metrics; the event loop is the only writer, so plain ints suffice."""

    def __init__(self, limit: int, queue: int, wait_s: float) -> None:
        self.limit = limit
        self.queue = queue
        self.wait_s = wait_s
        self.active = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(limit)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked():
            if self.waiting >= self.queue:
                raise OverloadedError(
                    f"{self.active} requests are running and {self.waiting} waiting, the most this server takes; "
                    "retry shortly"
                )
            self.waiting += 1
            try:
                # asyncio.timeout cancels the acquire cleanly: a permit won at the last moment is handed back.
                async with asyncio.timeout(self.wait_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise OverloadedError(f"no compute slot came free within {self.wait_s:g} s; retry shortly") from None
            finally:
                self.waiting -= 1
        else:
            await self._slots.acquire()  # a free permit: taken without suspending
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()
