"""`service.api.render`'s responses: large bodies are handed to the server in slices, with the same bytes and the
same Content-Length as whole, and held against the worker's budget for responses until sent or dropped."""

from __future__ import annotations

import asyncio
import gc
import math
import threading

import pytest
from starlette.background import BackgroundTask
from starlette.types import Message

from service import admission
from service.admission import ByteBudget
from service.api.render import SlicedResponse
from service.errors import OverloadedError

SLICE = SlicedResponse.SLICE


def sent(response: SlicedResponse, scope_type: str = "http") -> list[Message]:
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        messages.append(message)

    scope = {"type": scope_type, "method": "POST", "path": "/", "headers": []}
    asyncio.run(response(scope, receive, send))
    return messages


@pytest.mark.parametrize("size", [0, 1, SLICE - 1, SLICE, SLICE + 1, 3 * SLICE + 5])
def test_a_body_leaves_whole_or_in_slices_with_its_bytes_and_length(size: int) -> None:
    body = bytes(i % 251 for i in range(size))  # no slice repeats another's bytes at the same offset
    start, *parts = sent(SlicedResponse(body, media_type="application/json"))
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert dict(start["headers"])[b"content-length"] == str(size).encode()
    assert b"".join(p["body"] for p in parts) == body
    assert len(parts) == max(1, math.ceil(size / SLICE))
    assert [p.get("more_body", False) for p in parts] == [True] * (len(parts) - 1) + [False]
    assert all(len(p["body"]) <= SLICE for p in parts)


def test_a_response_with_a_background_task_is_sent_whole_and_runs_it() -> None:
    """Starlette runs a background task after the body; such a response keeps Starlette's own sending."""
    ran: list[bool] = []
    body = bytes(3 * SLICE)
    start, *parts = sent(SlicedResponse(body, background=BackgroundTask(lambda: ran.append(True))))
    assert [len(p["body"]) for p in parts] == [len(body)] and ran == [True]


def test_a_websocket_scope_gets_starlette_s_own_denial_response() -> None:
    """Outside plain HTTP (a denied websocket handshake), the response is Starlette's, unsliced."""
    messages = sent(SlicedResponse(bytes(2 * SLICE)), "websocket")
    assert [m["type"] for m in messages] == ["websocket.http.response.start", "websocket.http.response.body"]


@pytest.mark.parametrize(("size", "counted"), [(1, 0), (SLICE, 0), (SLICE + 1, SLICE + 1), (3 * SLICE, 3 * SLICE)])
def test_a_large_body_is_held_against_the_budget_until_it_has_been_sent(size: int, counted: int) -> None:
    budget = ByteBudget(10 * SLICE, "responses waiting to be sent", "responses")
    response = SlicedResponse(b"x" * size).hold(budget)
    assert budget.held == counted
    held_at_sends: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            held_at_sends.append(budget.held)

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    asyncio.run(response({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send))
    assert held_at_sends and set(held_at_sends) == {counted}  # held while every slice is sent
    assert budget.held == 0  # and given back once sent, while the response object still lives
    del response
    gc.collect()
    assert budget.held == 0  # once only


def test_a_large_body_dropped_unsent_gives_its_bytes_back() -> None:
    """A client that hangs up while its response is built: the response is dropped, never called."""
    budget = ByteBudget(10 * SLICE, "responses waiting to be sent", "responses")
    response = SlicedResponse(b"x" * (2 * SLICE)).hold(budget)
    assert budget.held == 2 * SLICE
    del response
    assert budget.held == 0


def test_a_large_body_that_does_not_fit_is_refused_and_holds_nothing() -> None:
    budget = ByteBudget(3 * SLICE, "responses waiting to be sent", "responses")
    first = SlicedResponse(b"x" * (2 * SLICE)).hold(budget)
    with pytest.raises(OverloadedError, match="the most it holds at once is 3,145,728"):
        SlicedResponse(b"y" * (2 * SLICE)).hold(budget)
    assert budget.held == 2 * SLICE
    SlicedResponse(b"z" * SLICE).hold(budget)  # not counted: a slice or less is the server's buffer's to bound
    assert budget.held == 2 * SLICE
    del first
    assert budget.held == 0


def test_a_refusal_while_the_collector_frees_a_held_response_does_not_deadlock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A held response that only the garbage collector can free (it is in a reference cycle) is freed while the
    budget refuses another: making the refusal's exception starts a collection (as making any object may), on the
    refusing thread, which gives the first response's bytes back there. Made under the budget's lock, that
    thread would wait for itself."""

    class CollectingOverloadedError(OverloadedError):
        def __init__(self, detail: str, reason: str, retry_after: int = 1) -> None:
            gc.collect()
            super().__init__(detail, reason, retry_after)

    monkeypatch.setattr(admission, "OverloadedError", CollectingOverloadedError)
    budget = ByteBudget(3 * SLICE, "responses waiting to be sent", "responses")
    response = SlicedResponse(b"x" * (2 * SLICE)).hold(budget)
    response.cycle = response  # type: ignore[attr-defined]  # freed by the collector only
    del response
    outcome: list[str] = []

    def refuse() -> None:
        try:
            budget.take(2 * SLICE)
            outcome.append("taken")
        except OverloadedError:
            outcome.append("refused")

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the refusing thread is stuck on the budget's lock"
    assert outcome == ["refused"]  # decided with the first response still held
    assert budget.held == 0  # then given back by the collector
