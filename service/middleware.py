"""ASGI middleware: the request body's size and time limits, enforced while the body streams in, and a bound on
the body bytes a worker holds at once over all its requests; HEAD served as GET; Starlette's CORS, refusing as
problem+json."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
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


class ProblemCORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware, whose refusal of a preflight ("Disallowed CORS origin, method", a text/plain
    400) is a problem+json body like every other client error; its headers (Vary, the allowed methods) stay."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" and scope["method"] == "OPTIONS" else None
        if headers is None or "origin" not in headers or "access-control-request-method" not in headers:
            await super().__call__(scope, receive, send)  # not a preflight: Starlette's own way
            return
        response = self.preflight_response(request_headers=headers)
        if response.status_code == 400:
            refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
            detail = f"CORS preflight refused: this {refused} is not allowed"
            problem = {"type": "about:blank", "title": "Bad Request", "status": 400, "detail": detail}
            kept = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
            body = json.dumps({**problem, "instance": scope["path"]})
            response = Response(body, 400, kept, media_type="application/problem+json")
        await response(scope, receive, send)


class HeadMiddleware:
    """HEAD, which every general-purpose server must support (RFC 9110, section 9.1), answered as the GET it stands
    for, with the same status and headers (Content-Length included) and no body. FastAPI's routes take only the
    methods they name, so HEAD on any of them was a 405, load balancers' health checks included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        inner = {**scope, "method": "GET"}  # a copy: the access log and the metrics say HEAD
        try:
            await self.app(inner, receive, without_body)
        finally:
            if "route" in inner:  # the route the router matched, for the metrics' and the access log's label
                scope["route"] = inner["route"]
