"""Admission control for compute: a dedicated pool of `limit` long-lived threads runs the torch work (all but a
lone light prediction's, which `service.batching` runs on the event loop while this pool is `idle`); at most
`queue` requests wait for one, each for at most `wait_s`; beyond that a request is refused at once
(backpressure, not collapse). Long-lived threads keep torch's per-thread state, and memory, bounded. And for
memory: `ByteBudget` bounds the bytes a worker holds at once over all its requests (bodies, responses)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from service.errors import OverloadedError

T = TypeVar("T")


class Admission:
    """Counts are read by /metrics; the event loop is the only writer, so plain ints suffice."""

    def __init__(self, limit: int, queue: int, wait_s: float, thread_setup: Callable[[], object] | None = None) -> None:
        self.limit = limit
        self.queue = queue
        self.wait_s = wait_s
        self.active = 0
        self.waiting = 0
        self.on_change: Callable[[], None] | None = None  # told after either count changes (metrics)
        self._slots = asyncio.Semaphore(limit)
        # `thread_setup` runs once on each compute thread as it starts (per-thread settings, such as OpenMP's).
        self._executor = ThreadPoolExecutor(limit, thread_name_prefix="compute", initializer=thread_setup)

    @property
    def idle(self) -> bool:
        """No work holds a slot or waits for one."""
        return self.active == 0 and self.waiting == 0

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on a compute thread once a slot is free; OverloadedError when none comes in time."""
        await self._acquire()
        self.active += 1
        self._changed()
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[T] = loop.create_future()
        try:
            work = self._executor.submit(contextvars.copy_context().run, fn, *args)
        except BaseException:
            self._release()
            raise
        # The work's end comes back to the loop as one callback that frees the slot and sets the outcome: a round
        # trip to a compute thread on the same CPU took 2 loop iterations and 39 µs, against 3 and 80 through
        # `run_in_executor` and `asyncio.shield`. The slot is freed when the work ends, not when the request does:
        # a client that hangs up (its task cancelled, `outcome` with it) cannot leave its work on a free slot.
        work.add_done_callback(functools.partial(self._hand_back, loop, outcome))
        return await outcome

    def _hand_back(self, loop: asyncio.AbstractEventLoop, outcome: asyncio.Future[T], work: Future[T]) -> None:
        try:  # on the compute thread (or on the loop's, when the work ended before this callback was added)
            loop.call_soon_threadsafe(self._settle, outcome, work)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    def _settle(self, outcome: asyncio.Future[T], work: Future[T]) -> None:
        self._release()
        if outcome.done():  # the request was cancelled
            return
        if work.cancelled():
            outcome.cancel()
        elif isinstance(error := work.exception(), StopIteration):  # asyncio refuses to carry it: a bug, as any
            outcome.set_exception(RuntimeError(f"the work raised StopIteration({error})"))
        elif error is not None:
            outcome.set_exception(error)
        else:
            outcome.set_result(work.result())

    async def _acquire(self) -> None:
        if not self._slots.locked():
            await self._slots.acquire()  # a free permit: taken without suspending
            return
        if self.waiting >= self.queue:
            raise OverloadedError(
                f"{self.active} requests are running and {self.waiting} waiting, the most this server takes; "
                "retry shortly",
                "queue_full",
            )
        self.waiting += 1
        self._changed()
        try:
            # asyncio.timeout cancels the acquire cleanly: a permit won at the last moment is handed back.
            async with asyncio.timeout(self.wait_s):
                await self._slots.acquire()
        except TimeoutError:
            raise OverloadedError(
                f"no compute slot came free within {self.wait_s:g} s; retry shortly", "queue_wait"
            ) from None
        finally:
            self.waiting -= 1
            self._changed()

    def _release(self) -> None:
        self.active -= 1
        self._changed()
        self._slots.release()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class ByteBudget:
    """The bytes of one kind (request bodies, responses) a worker may hold at once, over all its requests: a
    limit per request alone lets 1,024 connections hold 1,024 times that, and the worker be killed for memory.
    `take` counts bytes as held, or refuses them with OverloadedError (503, retry shortly) when they would pass
    `limit`; one item always fits while nothing else is held, so no request is refused for its size alone.
    `give_back` may come from any thread (a response freed by the garbage collector), hence the lock."""

    def __init__(self, limit: int, what: str, reason: str) -> None:
        self.limit = limit
        self.what = what  # for the refusal's detail: "request bodies being received"
        self.reason = reason  # and its reason, for the metrics: "request_bodies"
        self.held = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> None:
        # Nothing is made under the lock but ints: making an object can start the garbage collector, which may free
        # a held response and run its `give_back` on this thread, which would then wait for this lock for ever.
        with self._lock:
            held = self.held
            fits = not held or held + size <= self.limit
            if fits:
                self.held = held + size
        if not fits:
            raise OverloadedError(
                f"this worker holds {held:,} bytes of {self.what}, the most it holds at once is {self.limit:,}; "
                f"{size:,} more would not fit; retry shortly",
                self.reason,
            )

    def give_back(self, size: int) -> None:
        with self._lock:
            self.held -= size
