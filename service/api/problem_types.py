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

# Domain error -> (status, problem type slug, title). Order matters: subclasses before their bases.
PROBLEM_TYPES: tuple[tuple[type[FeatureMapError], int, str, str], ...] = (
    (UnsupportedMediaError, 415, "unsupported-media-type", "Unsupported media type"),
    (ImageDecodeError, 422, "invalid-image", "Invalid image"),
    (PipelineSpecError, 422, "invalid-spec", "Invalid pipeline spec"),
    (LimitExceededError, 413, "limit-exceeded", "Limit exceeded"),
    (DigitError, 422, "invalid-digit", "Not a readable digit"),
    (NoFeatureMapsError, 404, "no-feature-maps", "No feature maps"),
    (UnknownModelError, 404, "unknown-model", "Unknown model"),
    (ModelsLoadingError, 503, "models-loading", "Models loading"),
    (DeviceUnavailableError, 422, "device-unavailable", "Device unavailable"),
    (OverloadedError, 503, "overloaded", "Overloaded"),
    (ComputeTimeoutError, 504, "compute-timeout", "Compute time limit passed"),
    (RequestTimeoutError, 408, "request-timeout", "Request body too slow"),
    (UnauthorizedError, 401, "unauthorized", "Unauthorized"),
)


# Problems that are not domain errors: (status, title, what it means).
OTHER_PROBLEMS: dict[str, tuple[int, str, str]] = {
    "invalid-request": (422, "Invalid request", "A field has the wrong type or value; `errors` lists each one."),
    "out-of-memory": (503, "Out of memory", "The device ran out of memory for this request; retry later or ask less."),
}


class ProblemType(BaseModel):
    type: str = Field(examples=["/problems/invalid-spec"])
    title: str = Field(examples=["Invalid pipeline spec"])
    status: int = Field(examples=[422])
    description: str = Field(examples=["The pipeline spec cannot run; `issues` says where and why."])


def _catalogue() -> dict[str, ProblemType]:
    types = {
        slug: ProblemType(type=f"/problems/{slug}", title=title, status=status, description=_first_line(cls))
        for cls, status, slug, title in PROBLEM_TYPES
    }
    for slug, (status, title, text) in OTHER_PROBLEMS.items():
        types[slug] = ProblemType(type=f"/problems/{slug}", title=title, status=status, description=text)
    return types


def _first_line(cls: type[FeatureMapError]) -> str:
    return (cls.__doc__ or cls.__name__).strip().split("\n")[0]


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
