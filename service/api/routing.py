"""`DirectRoute`: a FastAPI route for an endpoint that reads its request and builds its response itself, served
without FastAPI's per-request handler (FastAPI's documented way to customise one: a custom `APIRoute` class)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import Any, cast

import fastapi.routing
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

Guard = Callable[[Request], Coroutine[Any, Any, object]]
_effective_route_context: ContextVar[Any] | None = getattr(fastapi.routing, "_effective_route_context_var", None)


class DirectRoute(APIRoute):
    """An `APIRoute` whose endpoint is `async def endpoint(request: Request) -> Response`, and whose dependencies are
    guards of the same shape (`async def guard(request: Request)`, such as the API-key check). Each request awaits
    the guards in order, then the endpoint, and nothing else: FastAPI's handler solves dependencies through its
    general machinery, opens its telemetry spans and checks a body it has no parameter for, which cost the
    prediction route 50-75 µs of its event loop's CPU a request (of about 500), measured in-process on one CPU.
    The OpenAPI document is FastAPI's own, from the same declarations, and `app.dependency_overrides` still
    replace a guard. A parameter or dependency of any other shape fails when the route is made, not when served."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        # Called as the route is made, and again by FastAPI for each inclusion: the checks run before serving.
        dependant = self._dependant()
        _check_request_only(dependant, f"the endpoint of {self.path}")
        for dependency in dependant.dependencies:
            _check_request_only(dependency, f"a dependency of {self.path}")
            if dependency.dependencies or dependency.name is not None:  # a named one's value would go to a parameter
                raise TypeError(
                    f"{self.path}: a DirectRoute's dependencies are guards (`dependencies=[...]`) that take only "
                    "the request"
                )
        guards: tuple[Guard, ...] = tuple(d.call for d in dependant.dependencies)  # type: ignore[misc]
        endpoint = self.endpoint

        async def handle(request: Request) -> Response:
            overrides = getattr(request.app, "dependency_overrides", {})  # a FastAPI app's; a Starlette one has none
            for guard in guards:
                await overrides.get(guard, guard)(request)
            response: Response = await endpoint(request)
            return response

        return handle

    def _dependant(self) -> Dependant:
        """The dependant FastAPI's own `get_route_handler` serves: for an inclusion, the inclusion's (with the
        dependencies `include_router` adds), which FastAPI (pinned) hands over in a context variable."""
        context = _effective_route_context.get() if _effective_route_context is not None else None
        if context is not None and getattr(context, "original_route", None) is self:
            return cast(Dependant, context.dependant)
        return self.dependant


def _check_request_only(dependant: Dependant, what: str) -> None:
    call = dependant.call
    others = (
        dependant.path_params,
        dependant.query_params,
        dependant.header_params,
        dependant.cookie_params,
        dependant.body_params,
    )
    named = (
        dependant.websocket_param_name,
        dependant.http_connection_param_name,
        dependant.response_param_name,
        dependant.background_tasks_param_name,
        dependant.security_scopes_param_name,
    )
    if not inspect.iscoroutinefunction(call) or dependant.request_param_name is None or any(others) or any(named):
        raise TypeError(f"{what} must be `async def f(request: Request)` to be served by a DirectRoute")
