"""ASGI middleware: the request body limit, enforced while the body streams in."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import LimitExceededError


class BodyLimitMiddleware:
    """Stops reading a body at `max_bytes`: a declared Content-Length over it fails before any byte is read,
    an undeclared (chunked) body fails as soon as the count passes it. The error surfaces where the route
    reads the body, so it becomes a 413 problem like any other `LimitExceededError`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        limit = self.max_bytes
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > limit:
                raise LimitExceededError(f"the request body is {declared:,} bytes; the limit is {limit:,}")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise LimitExceededError(f"the request body is over the limit of {limit:,} bytes")
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
