"""`DirectRoute`: guards, then the endpoint, and nothing else; any other shape of route refused when it is made."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, Response

from service.api import predict
from service.api.deps import require_api_key
from service.api.routing import DirectRoute
from tests.conftest import make_client

calls: list[str] = []


async def first(request: Request) -> None:
    calls.append("first")


async def second(request: Request) -> None:
    calls.append("second")
    if request.headers.get("x-deny"):
        raise HTTPException(403, "denied")


async def endpoint(request: Request) -> Response:
    calls.append("endpoint")
    return PlainTextResponse(request.url.path)


def app_with(*guards: Callable[..., Any]) -> FastAPI:
    router = APIRouter(dependencies=[Depends(g) for g in guards])
    router.add_api_route("/x", endpoint, methods=["POST"], route_class_override=DirectRoute)
    app = FastAPI()
    app.include_router(router)
    return app


def test_guards_run_in_order_then_the_endpoint() -> None:
    calls.clear()
    with TestClient(app_with(first, second)) as c:
        r = c.post("/x")
        assert (r.status_code, r.text, calls) == (200, "/x", ["first", "second", "endpoint"])
        calls.clear()
        denied = c.post("/x", headers={"X-Deny": "1"})
        assert (denied.status_code, denied.json(), calls) == (403, {"detail": "denied"}, ["first", "second"])


def test_guards_an_inclusion_adds_run_first() -> None:
    calls.clear()
    router = APIRouter(dependencies=[Depends(second)])
    router.add_api_route("/x", endpoint, methods=["POST"], route_class_override=DirectRoute)
    app = FastAPI()
    app.include_router(router, prefix="/in", dependencies=[Depends(first)])
    with TestClient(app) as c:
        assert c.post("/in/x").text == "/in/x"
        assert calls == ["first", "second", "endpoint"]
        assert c.post("/in/x", headers={"X-Deny": "1"}).status_code == 403


def test_a_plain_starlette_app_serves_it_without_overrides() -> None:
    calls.clear()
    router = APIRouter(dependencies=[Depends(first)])
    router.add_api_route("/x", endpoint, methods=["POST"], route_class_override=DirectRoute)
    with TestClient(Starlette(routes=router.routes)) as c:
        assert c.post("/x").text == "/x"
    assert calls == ["first", "endpoint"]


def test_dependency_overrides_replace_a_guard() -> None:
    calls.clear()
    app = app_with(first, second)

    async def instead(request: Request) -> None:
        calls.append("instead")

    app.dependency_overrides[second] = instead
    with TestClient(app) as c:
        assert c.post("/x", headers={"X-Deny": "1"}).status_code == 200
    assert calls == ["first", "instead", "endpoint"]


async def with_query(request: Request, q: int) -> Response:
    return PlainTextResponse(str(q))


def sync_endpoint(request: Request) -> Response:
    return PlainTextResponse("")


async def with_value(request: Request, value: None = Depends(first)) -> Response:
    return PlainTextResponse("")


async def no_request() -> Response:
    return PlainTextResponse("")


async def header_guard(x_key: str = Header()) -> None:
    pass


def sync_guard(request: Request) -> None:
    pass


async def nested_guard(request: Request, _: None = Depends(first)) -> None:
    pass


@pytest.mark.parametrize(
    ("route_endpoint", "guards", "said"),
    [
        (with_query, [], "endpoint of /x must be `async def f(request: Request)`"),
        (sync_endpoint, [], "endpoint of /x must be"),
        (no_request, [], "endpoint of /x must be"),
        (with_value, [], "guards (`dependencies=[...]`)"),
        (endpoint, [header_guard], "a dependency of /x must be"),
        (endpoint, [sync_guard], "a dependency of /x must be"),
        (endpoint, [nested_guard], "guards (`dependencies=[...]`) that take only the request"),
    ],
)
def test_other_shapes_are_refused_when_the_route_is_made(
    route_endpoint: Callable[..., Any], guards: list[Callable[..., Any]], said: str
) -> None:
    router = APIRouter(dependencies=[Depends(g) for g in guards])
    with pytest.raises(TypeError, match=re.escape(said)):
        router.add_api_route("/x", route_endpoint, methods=["POST"], route_class_override=DirectRoute)


def test_the_prediction_routes_are_direct_and_keep_their_api_key_guard() -> None:
    routes = [
        r for r in (*predict.router.routes, *predict.unversioned.routes) if getattr(r, "name", "").startswith("predict")
    ]
    assert [type(r) for r in routes] == [DirectRoute, DirectRoute]
    assert all([d.call for d in r.dependant.dependencies] == [require_api_key] for r in routes)  # type: ignore[attr-defined]
    with make_client() as c:

        async def refuse(request: Request) -> None:
            raise HTTPException(418, "no")

        c.app.dependency_overrides[require_api_key] = refuse  # type: ignore[attr-defined]
        assert c.post("/v1/predict", json={"pixels": [[0] * 28] * 28}).status_code == 418
