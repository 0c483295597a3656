"""Large bodies are handed to the server in slices: the same bytes and the same Content-Length, whole or not."""

from __future__ import annotations

import asyncio
import math

import pytest
from starlette.types import Message

from service.api.render import SlicedResponse

SLICE = SlicedResponse.SLICE


def sent(response: SlicedResponse) -> list[Message]:
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        messages.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
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
