"""Liveness and readiness probes: cheap, unauthenticated, never touch torch."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import ReadinessDep
from service.schemas import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse)
async def check_liveness() -> HealthResponse:
    """200 while the process is alive."""
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "Starting up or shutting down"}},
)
async def check_readiness(readiness: ReadinessDep) -> JSONResponse:
    """200 once warmed up and serving; 503 while starting or stopping."""
    body = HealthResponse(status=readiness.state).model_dump()
    return JSONResponse(body, status_code=200 if readiness.ready else 503)
