"""ASGI middleware: the request body's size and time limits, enforced while the body streams in, and a bound on
the body bytes a worker holds at once over all its requests."""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission import ByteBudget
from service.errors import LimitExceededError, RequestTimeoutError


class BodyLimitMiddleware:
    """Stops reading a body at `max_bytes`: a declared Content-Length over it fails before any byte is read,
    an undeclared (chunked) body fails as soon as the count passes it. The error surfaces where the route
    reads the body, so it becomes a 413 problem like any other `LimitExceededError`. A body that has not fully
    arrived `timeout_s` after the first read is cut off with a 408 (slow clients cannot hold a worker).

    Every body is also counted against the worker's `budget` from its first read until its request ends: a
    declared Content-Length at once, before any byte is read, an undeclared one as it arrives. A body that does
    not fit gets a 503 problem with Retry-After (`OverloadedError`), and the bodies already held are unharmed."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, budget: ByteBudget) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        limit = self.max_bytes
        received = 0
        held = 0  # of the worker's budget, for this body
        deadline: float | None = None
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, held, deadline, body_done
            if body_done:  # later reads wait for a disconnect: no limits apply
                return await receive()
            if declared is not None and declared > limit:
                raise LimitExceededError(f"the request body is {declared:,} bytes; the limit is {limit:,}")
            if declared and not held:
                self.budget.take(declared)  # all of it, before any byte is read
                held = declared
            now = time.monotonic()
            deadline = deadline or now + self.timeout_s
            try:
                async with asyncio.timeout_at(asyncio.get_running_loop().time() + max(deadline - now, 0.001)):
                    message = await receive()  # asyncio.timeout: no extra task per read, unlike wait_for
            except TimeoutError:
                raise RequestTimeoutError(
                    f"the request body did not arrive within {self.timeout_s:g} s ({received:,} bytes came)"
                ) from None
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                received += size
                if received > limit:
                    raise LimitExceededError(f"the request body is over the limit of {limit:,} bytes")
                if declared is None and size:
                    self.budget.take(size)
                    held += size
                body_done = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            self.budget.give_back(held)  # the body may be held until the response has been sent


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
