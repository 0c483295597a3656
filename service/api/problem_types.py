"""The problem types this API answers with (RFC 9457 `type` URIs, `/problems/<slug>`), and the routes that
document each one, so that a `type` in an error body resolves to what it means."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.exceptions import HTTPException
from pydantic import BaseModel, Field

from service.api.docs import problem_responses
from service.errors import (
    ComputeTimeoutError,
    DeviceUnavailableError,
    DigitError,
    FeatureMapError,
    ImageDecodeError,
    InferenceRequestError,
    LimitExceededError,
    ModelsLoadingError,
    NoFeatureMapsError,
    OverloadedError,
    PipelineSpecError,
    RequestTimeoutError,
    UnauthorizedError,
    UnknownModelError,
    UnsupportedMediaError,
)

# Domain error -> (status, problem type slug, title, what it means to a client).
# Order matters: subclasses before their bases.
# fmt: off
PROBLEM_TYPES: tuple[tuple[type[FeatureMapError], int, str, str, str], ...] = (
    (UnsupportedMediaError, 415, "unsupported-media-type", "Unsupported media type", "The body is neither multipart nor JSON, or the file is not PNG, JPEG, BMP, GIF, WebP or TIFF."),
    (ImageDecodeError, 422, "invalid-image", "Invalid image", "The file is empty, corrupt or truncated."),
    (PipelineSpecError, 422, "invalid-spec", "Invalid pipeline spec", "The spec is well-formed but cannot run; `errors` says where and why."),
    (LimitExceededError, 413, "limit-exceeded", "Limit exceeded", "A configured limit was exceeded: body size, image pixels, stages, filters, kernel side, output or work."),
    (DigitError, 422, "invalid-digit", "Not a readable digit", "The image or pixels cannot be read as one digit (blank, wrong size, values out of range)."),
    (NoFeatureMapsError, 404, "no-feature-maps", "No feature maps", "The model has no convolutional layers to show."),
    (UnknownModelError, 404, "unknown-model", "Unknown model", "No model of that name is served; the detail lists those that are."),
    (ModelsLoadingError, 503, "models-loading", "Models loading", "The models are still loading at start-up; retry after Retry-After."),
    (DeviceUnavailableError, 422, "device-unavailable", "Device unavailable", "The requested device is not present; `available_devices` lists those that are."),
    (OverloadedError, 503, "overloaded", "Overloaded", "Every compute slot is busy and the queue is full, or the worker holds as many request body bytes, or bytes of answers waiting to be sent, as it may at once; retry after Retry-After."),
    (ComputeTimeoutError, 504, "compute-timeout", "Compute time limit passed", "The request's work passed the per-request compute time limit and was stopped."),
    (RequestTimeoutError, 408, "request-timeout", "Request body too slow", "The request body did not arrive within the configured time."),
    (UnauthorizedError, 401, "unauthorized", "Unauthorized", "An API key is required: send X-API-Key or Authorization: Bearer."),
    (InferenceRequestError, 400, "invalid-inference-request", "Invalid inference request", "An Open Inference Protocol (/v2) request is malformed or does not fit the model (input name, datatype, shape, data, binary sizes, outputs); `error` repeats `detail` for KServe and Triton clients."),
)
# fmt: on


# Problems that are not domain errors: (status, title, what it means).
OTHER_PROBLEMS: dict[str, tuple[int, str, str]] = {
    "invalid-request": (422, "Invalid request", "A field has the wrong type or value; `errors` lists each one."),
    "out-of-memory": (503, "Out of memory", "The device ran out of memory for this request; retry later or ask less."),
    "device-failed": (503, "Device failed", "A GPU failed on the request; one that no longer computes is taken out."),
}


class ProblemType(BaseModel):
    type: str = Field(examples=["/problems/invalid-spec"])
    title: str = Field(examples=["Invalid pipeline spec"])
    status: int = Field(examples=[422])
    description: str = Field(examples=["The pipeline spec cannot run; `issues` says where and why."])


def _catalogue() -> dict[str, ProblemType]:
    rows = [(slug, status, title, text) for _, status, slug, title, text in PROBLEM_TYPES]
    rows += [(slug, status, title, text) for slug, (status, title, text) in OTHER_PROBLEMS.items()]
    return {
        slug: ProblemType(type=f"/problems/{slug}", title=title, status=status, description=text)
        for slug, status, title, text in rows
    }


CATALOGUE = _catalogue()
router = APIRouter(prefix="/problems", tags=["health"], responses=problem_responses(404))


@router.get("", response_model=list[ProblemType])
async def list_problem_types() -> list[ProblemType]:
    """Every problem type the API answers with."""
    return list(CATALOGUE.values())


@router.get("/{slug}", response_model=ProblemType)
async def describe_problem_type(slug: str) -> ProblemType:
    """What one problem type means: the `type` of an error body resolves here."""
    if slug not in CATALOGUE:
        raise HTTPException(404, f"no problem type {slug!r}; GET /problems lists them")
    return CATALOGUE[slug]
