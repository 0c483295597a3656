"""GET /metrics: Prometheus counters and latency histograms per route and status, in-flight and queue depth."""

from __future__ import annotations

from typing import cast

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from service.observability import Metrics

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"example": "featuremap_requests_total{...} 42.0"}}}},
)
def export_metrics(request: Request) -> Response:
    """The metrics in Prometheus text format (unauthenticated, like the health probes)."""
    metrics = cast(Metrics, request.state.metrics)
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
