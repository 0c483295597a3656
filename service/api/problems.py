"""Shared OpenAPI declarations of the problem+json error responses."""

from __future__ import annotations

from typing import Any

from service.schemas import Problem

PROBLEM_JSON = "application/problem+json"


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries documenting each status as an RFC 9457 problem body."""
    descriptions = {
        400: "Malformed request (e.g. a broken multipart body)",
        401: "Missing or wrong API key",
        404: "No such resource",
        413: "A limit was exceeded (body size, image pixels, output elements, work)",
        415: "Unsupported content type or image format",
        422: "The request is well-formed but invalid; `errors` points at each field",
        503: "Not ready or overloaded",
    }
    return {
        s: {"description": descriptions.get(s, "Error"), "model": Problem, "content": {PROBLEM_JSON: {}}}
        for s in statuses
    }
