"""BodyLimitMiddleware's bound on the body bytes a worker holds at once, at the ASGI level: requests in flight
together, each held at a known point."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from pydantic import ValidationError
from starlette.types import Message, Receive, Scope, Send

from service.admission import ByteBudget
from service.config import Settings
from service.errors import LimitExceededError, OverloadedError
from service.middleware import BodyLimitMiddleware

Outcome = str  # "read N bytes" or the error's class name


def _scope(declared: int | None) -> Scope:
    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    return {"type": "http", "method": "POST", "path": "/", "headers": headers}


def _client(chunks: list[bytes]) -> Receive:
    pending = list(chunks)

    async def receive() -> Message:
        if not pending:
            await asyncio.Event().wait()  # nothing more: as a client that keeps the connection open
        body = pending.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    return receive


async def _nowhere(message: Message) -> None:
    pass


def _reading_app(outcomes: list[Outcome], hold: asyncio.Event) -> Callable[[Scope, Receive, Send], object]:
    """Reads the whole body, then keeps its request open until `hold` is set."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        try:
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
        except (OverloadedError, LimitExceededError) as e:
            outcomes.append(type(e).__name__)
            return
        outcomes.append(f"read {len(body)} bytes")
        await hold.wait()

    return app


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_bodies_past_the_workers_budget_get_503_and_their_bytes_come_back_when_requests_end(declared: bool) -> None:
    async def scenario() -> tuple[list[Outcome], list[int]]:
        outcomes: list[Outcome] = []
        hold = asyncio.Event()
        budget = ByteBudget(10_000, "request bodies being received", "request_bodies")
        guard = BodyLimitMiddleware(_reading_app(outcomes, hold), max_bytes=8_000, timeout_s=10, budget=budget)
        chunks = [b"a" * 3_000, b"b" * 3_000]  # 6,000 bytes a body

        def request() -> asyncio.Task[None]:
            scope = _scope(6_000 if declared else None)
            return asyncio.create_task(guard(scope, _client(chunks), _nowhere))  # type: ignore[arg-type]

        held: list[int] = []
        first = request()
        while not (outcomes or first.done()):  # until the first body has been read and its request waits on `hold`
            await asyncio.sleep(0)
        held.append(budget.held)  # the first body, held while its request is open
        second = request()  # 6,000 more do not fit in 10,000
        await asyncio.wait_for(second, 10)  # a second body let in would wait on `hold` instead
        held.append(budget.held)
        hold.set()
        await asyncio.wait_for(first, 10)
        held.append(budget.held)
        third = request()  # fits again
        await asyncio.wait_for(third, 10)
        held.append(budget.held)
        return outcomes, held

    outcomes, held = asyncio.run(scenario())
    assert outcomes == ["read 6000 bytes", "OverloadedError", "read 6000 bytes"]
    # Chunked, the refused body held its first 3,000 bytes until its request ended; declared, it held none.
    assert held == [6_000, 6_000, 0, 0]


def test_a_body_over_its_own_limit_is_413_not_503_and_holds_nothing_after() -> None:
    async def scenario() -> tuple[list[Outcome], int]:
        outcomes: list[Outcome] = []
        budget = ByteBudget(100_000, "request bodies being received", "request_bodies")
        guard = BodyLimitMiddleware(
            _reading_app(outcomes, asyncio.Event()), max_bytes=5_000, timeout_s=10, budget=budget
        )
        await guard(_scope(None), _client([b"x" * 3_000, b"y" * 3_000]), _nowhere)
        await guard(_scope(9_000), _client([b"z" * 9_000]), _nowhere)
        return outcomes, budget.held

    assert asyncio.run(scenario()) == (["LimitExceededError", "LimitExceededError"], 0)


def test_the_budget_must_hold_one_body_of_the_allowed_size() -> None:
    with pytest.raises(ValidationError, match="FEATUREMAP_MAX_BODY_BYTES_IN_FLIGHT"):
        Settings(max_body_bytes=2_000, max_body_bytes_in_flight=1_999)
    assert Settings(max_body_bytes=2_000, max_body_bytes_in_flight=2_000).max_body_bytes_in_flight == 2_000
