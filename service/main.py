"""The ASGI app: `create_app(settings)` builds it, the lifespan warms torch up, and every error leaves as
RFC 9457 problem+json from the one mapping below. `app` is what `uvicorn service.main:app` serves."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from service import __version__
from service.admission import Admission, ByteBudget
from service.api import demo, featuremaps, filters, health, models, oip, predict, problem_types
from service.api import metrics as metrics_api
from service.api.deps import API_KEY_SCHEMES, require_api_key
from service.api.docs import PROBLEM_JSON
from service.api.problem_types import OTHER_PROBLEMS, PROBLEM_TYPES
from service.batching import MicroBatcher
from service.classifiers import Registry
from service.config import Settings
from service.cpus import CPU_CLAIMS_ENV, READY_DIR_ENV, pin_worker, threads_per_slot, worker_processes
from service.devices import take_failed_devices_out_of_service, use_ieee_float32
from service.errors import (
    DeviceUnavailableError,
    FeatureMapError,
    Loc,
    ModelsLoadingError,
    OverloadedError,
    PipelineSpecError,
    RequestTimeoutError,
    UnauthorizedError,
    UnknownModelError,
    format_loc,
)
from service.memory import tune_allocator
from service.middleware import BodyLimitMiddleware, HeadMiddleware, ProblemCORSMiddleware
from service.observability import Metrics, RequestContextMiddleware
from service.readiness import Readiness, warm_up
from service.schemas import (
    UNION_TAGS,
    FeaturemapsJSONRequest,
    ModelFeaturemapsJSONRequest,
    PredictJSONRequest,
    Problem,
)

log = logging.getLogger("service")

DESCRIPTION = """Shows what a convolutional network sees: post an image and a pipeline of filters, activations and
pooling; get every stage's feature maps back as PNGs or exact float32 tensors.

Errors are RFC 9457 `application/problem+json` bodies; `errors` points at each offending field."""


def problem(
    status: int,
    detail: str,
    request: Request,
    slug: str | None = None,
    title: str | None = None,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"/problems/{slug}" if slug else "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    if errors:
        body["errors"] = errors
    body.update(extra)
    if request.url.path == "/v2" or request.url.path.startswith("/v2/"):
        body["error"] = detail  # Open Inference Protocol clients (tritonclient, KServe) show `error`
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _field_error(loc: Loc, detail: str) -> dict[str, str]:
    return {
        "field": format_loc(loc),
        "pointer": "#" + "".join(f"/{p}" for p in loc),
        "detail": detail,
    }


# Pydantic puts union tags and member type names into `loc`; clients want the field path only.
_TYPE_LABEL = re.compile(r"^(int|float|str|bool|none|constrained-\w+|function-\w+|[\w-]+\[.*\])$")


def _clean_loc(loc: tuple[Any, ...]) -> Loc:
    out: list[str | int] = []
    for part in loc:
        if isinstance(part, str) and (part in UNION_TAGS or _TYPE_LABEL.match(part)):
            continue
        out.append(part)
    if out and out[0] == "body":
        out = out[1:]
    return tuple(out)


def install_problem_handlers(app: FastAPI) -> None:
    """The one place where errors become HTTP responses."""

    @app.exception_handler(FeatureMapError)
    async def domain_error(request: Request, exc: Exception) -> Response:
        status, slug, title = next(
            ((status, slug, title) for cls, status, slug, title, _ in PROBLEM_TYPES if isinstance(exc, cls)),
            (400, "bad-request", "Bad request"),
        )
        assert isinstance(exc, FeatureMapError)
        errors = None
        extra: dict[str, Any] = {}
        headers: dict[str, str] | None = None
        if isinstance(exc, PipelineSpecError):
            errors = [_field_error(i.loc, i.msg) for i in exc.issues]
        elif exc.loc:
            errors = [_field_error(exc.loc, str(exc))]
        if isinstance(exc, DeviceUnavailableError):
            extra["available_devices"] = list(exc.available)
        if isinstance(exc, UnknownModelError) and exc.loc:
            status = 422  # a body field naming no model is an invalid field; a path naming none is a 404
        if isinstance(exc, ModelsLoadingError | OverloadedError):
            headers = {"Retry-After": str(getattr(exc, "retry_after", 1))}
        elif isinstance(exc, UnauthorizedError):
            headers = {"WWW-Authenticate": 'Bearer realm="featuremap", ApiKey header="X-API-Key"'}
        elif isinstance(exc, RequestTimeoutError):
            headers = {"Connection": "close"}
        if isinstance(exc, OverloadedError) and (metrics := getattr(request.state, "metrics", None)) is not None:
            metrics.refused(exc.reason)
        return problem(status, str(exc), request, slug, title, errors, headers, **extra)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        merged: dict[Loc, list[str]] = {}
        for err in exc.errors():
            msgs = merged.setdefault(_clean_loc(tuple(err.get("loc", ()))), [])
            if err["msg"] not in msgs:
                msgs.append(err["msg"])
        errors = [_field_error(loc, "; or ".join(msgs)) for loc, msgs in merged.items()]
        first = errors[0] if errors else {"field": "", "detail": "invalid request"}
        where = f"{first['field']}: " if first["field"] else ""
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        status, title, _ = OTHER_PROBLEMS["invalid-request"]
        return problem(status, f"{where}{first['detail']}{more}", request, "invalid-request", title, errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        phrase = HTTPStatus(exc.status_code).phrase
        detail = (
            exc.detail
            if isinstance(exc.detail, str) and exc.detail != phrase
            else _HTTP_DETAIL.get(exc.status_code, phrase)
        )
        default = exc.detail == phrase  # raised by routing itself, not with a message of our own
        if exc.status_code == 404 and default:
            detail = f"no route {request.method} {request.url.path}; see /docs"
        elif exc.status_code == 405 and default:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return problem(exc.status_code, detail, request, headers=dict(exc.headers) if exc.headers else None)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: Exception) -> Response:
        # The client closed its connection before its body was complete: no one to answer, nothing went wrong here.
        # 499 ("client closed request", as nginx logs it) goes to the access log and the metrics, not a 500.
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(torch.OutOfMemoryError)
    @app.exception_handler(MemoryError)
    async def out_of_memory(request: Request, exc: Exception) -> Response:
        # Nothing to free here: torch's caching allocator has already given back its cache and tried again before
        # it raised, and the request's tensors go as its frames unwind.
        log.warning("out of memory on %s %s: %s", request.method, request.url.path, exc)
        detail = "the device ran out of memory for this request; retry later or ask for less"
        status, title, _ = OTHER_PROBLEMS["out-of-memory"]
        return problem(status, detail, request, "out-of-memory", title, headers={"Retry-After": "1"})

    @app.exception_handler(torch.AcceleratorError)
    async def device_error(request: Request, exc: Exception) -> Response:
        # A CUDA error: out of memory where torch does not raise OutOfMemoryError (pinned host memory, cuBLAS's
        # workspace), or a device that failed. A GPU that can no longer compute is taken out of service (`auto` then
        # means the next device) rather than fail every request sent to it; the probe waits on the GPU, so it runs
        # on a thread, not on the event loop.
        if "out of memory" in str(exc):
            return await out_of_memory(request, exc)
        rid = getattr(request.state, "request_id", "")
        log.error("device error on %s %s", request.method, request.url.path, exc_info=exc, extra={"request_id": rid})
        failed = await asyncio.to_thread(take_failed_devices_out_of_service)
        if failed:
            log.error("%s failed the probe after a device error: taken out of service", ", ".join(failed))
        taken = f"; {', '.join(failed)} no longer computes and is out of service" if failed else ""
        detail = f"the device failed while computing this request{taken}; retry (logged with request id {rid})"
        status, title, _ = OTHER_PROBLEMS["device-failed"]
        return problem(status, detail, request, "device-failed", title, headers={"Retry-After": "1"})

    @app.exception_handler(RuntimeError)
    async def runtime_error(request: Request, exc: Exception) -> Response:
        if "can't allocate memory" in str(exc):  # torch's CPU allocator, refused memory: not a MemoryError
            return await out_of_memory(request, exc)
        raise exc  # on to the outermost handler, `unexpected_error` (a 500)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        # This answer bypasses the request-id middleware (it is sent from outside it), so it sets the header.
        rid = getattr(request.state, "request_id", "")
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc, extra={"request_id": rid})
        detail = f"an unexpected error occurred; it has been logged with request id {rid}"
        return problem(500, detail, request, headers={"X-Request-ID": rid})


_HTTP_DETAIL = {400: "the request could not be parsed"}
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client went away before it was answered


def _drain_on_sigterm(readiness: Readiness, delay_s: float) -> Callable[[], None]:
    """On SIGTERM, turn /readyz to 503 at once, keep serving for `delay_s` (so load balancers stop sending),
    then hand the signal to the server, which finishes in-flight requests and exits. Returns an undo."""
    if threading.current_thread() is not threading.main_thread():  # e.g. under TestClient: no signals there
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        readiness.mark_stopping()
        log.info("SIGTERM: not ready; shutting down in %g s", delay_s)
        if callable(previous):
            threading.Timer(delay_s, previous, args=(signum, frame)).start()

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def _unique_id(route: APIRoute) -> str:
    return route.name


def _publish_api_key_security(schema: dict[str, Any], routes: list[BaseRoute]) -> None:
    """The key schemes on every operation that `require_api_key` guards (it reads the headers itself)."""

    def guarded(dependant: Dependant) -> bool:
        return dependant.call is require_api_key or any(guarded(d) for d in dependant.dependencies)

    secured = [
        route  # a route as included (prefix and router dependencies applied)
        for route in iter_route_contexts(routes)
        if isinstance(getattr(route, "dependant", None), Dependant)
        and route.include_in_schema
        and guarded(route.dependant)
    ]
    for route in secured:
        for method in route.methods or ():
            schema["paths"][route.path_format][method.lower()]["security"] = [
                {scheme.scheme_name: []} for scheme in API_KEY_SCHEMES
            ]
    if secured:
        schema["components"]["securitySchemes"] = {
            scheme.scheme_name: jsonable_encoder(scheme.model, by_alias=True, exclude_none=True)
            for scheme in API_KEY_SCHEMES
        }


def _on_thread(setup: Callable[[], object], target: Callable[..., None], *args: Any) -> None:
    setup()
    target(*args)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app around `settings` (read from FEATUREMAP_* variables when not given)."""
    tune_allocator()  # first, before the compute threads exist: large buffers are reused, not faulted in anew
    use_ieee_float32()  # maps and predictions on CUDA agree with the CPU's to float32 rounding
    settings = settings or Settings()

    # Each compute thread's torch ops get their share of the cores, so concurrent requests do not oversubscribe
    # them (the main way to lose throughput on a small machine). The count is set on every thread that runs
    # torch: OpenMP keeps it per thread, and oneDNN's convolutions on a thread that never set it ran a team of
    # one thread per core (seen here: two extra threads in each worker, on top of the other workers' ones).
    torch_threads = settings.torch_threads or threads_per_slot(settings.compute_slots)
    use_torch_threads = functools.partial(torch.set_num_threads, torch_threads)
    claims = os.environ.get(CPU_CLAIMS_ENV)  # set by `python -m service` for its workers
    if claims and settings.pin_workers:  # before the compute threads start: they inherit the CPU
        cpu = pin_worker(Path(claims), worker_processes(), settings.compute_slots * torch_threads)
        if cpu is not None:
            log.info("this worker runs on CPU %d", cpu, extra={"cpu": cpu})
    admission = Admission(settings.compute_slots, settings.max_queue, settings.queue_wait_s, use_torch_threads)
    metrics = Metrics(admission)
    max_pending = max(settings.max_queue, 1) * settings.batch_max_size

    def lone_and_light(job: predict.PredictJob) -> bool:  # a lone light prediction runs on the loop (batching)
        return metrics.requests_in_flight == 1 and predict.is_light(job)

    batcher = MicroBatcher(predict.predict_many, admission, settings.batch_max_size, max_pending, lone_and_light)
    responses = ByteBudget(settings.max_response_bytes_in_flight, "responses waiting to be sent", "responses")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        use_torch_threads()
        peers = os.environ.get(READY_DIR_ENV)
        readiness = Readiness(Path(peers) if peers else None, worker_processes())
        registry = Registry()
        restore_sigterm = _drain_on_sigterm(readiness, settings.shutdown_delay_s)
        if settings.warmup:
            args = (readiness, registry, settings.models_dir)
            threading.Thread(
                target=_on_thread, args=(use_torch_threads, warm_up, *args), name="warm-up", daemon=True
            ).start()
        else:
            registry.load(settings.models_dir)
            readiness.mark_ready()
        yield {
            "settings": settings,
            "readiness": readiness,
            "registry": registry,
            "admission": admission,
            "batcher": batcher,
            "metrics": metrics,
            "responses": responses,
        }
        readiness.mark_stopping()
        restore_sigterm()
        admission.close()
        metrics.worker_stopped()

    app = FastAPI(
        title="Feature Map Service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=_unique_id,
    )
    # Outermost last: request ids and metrics see everything, CORS answers preflights, the body guard is inner.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        budget=ByteBudget(settings.max_body_bytes_in_flight, "request bodies being received", "request_bodies"),
    )
    if settings.cors_origins:
        app.add_middleware(
            ProblemCORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["Accept", "Authorization", "Content-Type", "X-API-Key", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
            max_age=600,
        )
    app.add_middleware(HeadMiddleware)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    install_problem_handlers(app)
    # Routing tries the routers in this order, so the most requested come first: each one a request passes costs
    # it about 10 µs (the predict route was 6th: 60-90 µs a request, measured in-process). The OpenAPI document
    # and /docs list them in the same order.
    before = (predict, featuremaps, models, oip)
    after = (filters, health, metrics_api, problem_types, demo)
    for router in (*(m.router for m in before), oip.models_router, *(m.router for m in after), predict.unversioned):
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            # Request bodies parsed by hand (multipart or JSON on one route) still get their models published.
            bodies = (FeaturemapsJSONRequest, PredictJSONRequest, ModelFeaturemapsJSONRequest, Problem)
            _, extra = models_json_schema(
                [(model, "validation") for model in bodies], ref_template="#/components/schemas/{model}"
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(extra.get("$defs", {}))
            _publish_api_key_security(schema, app.routes)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


app = create_app()
