"""Shared OpenAPI declarations: the problem+json error responses and the image request bodies."""

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
        408: "The request body arrived too slowly",
        413: "A limit was exceeded (body size, image pixels, output elements, work)",
        415: "Unsupported content type or image format",
        422: "The request is well-formed but invalid; `errors` points at each field",
        503: "Overloaded (queue full), models still loading, or out of memory; see Retry-After",
        504: "The work passed the per-request compute time limit",
    }
    schema = {"$ref": f"#/components/schemas/{Problem.__name__}"}  # published by main's openapi()
    return {
        s: {"description": descriptions.get(s, "Error"), "content": {PROBLEM_JSON: {"schema": schema}}}
        for s in statuses
    }


IMAGE_FIELD: dict[str, Any] = {
    "type": "string",
    "format": "binary",
    "description": "PNG, JPEG, BMP, GIF, WebP or TIFF.",
}


def image_request_body(
    form_fields: dict[str, dict[str, Any]], json_model: str, json_examples: dict[str, Any]
) -> dict[str, Any]:
    """`openapi_extra` for a route that takes multipart (file `image` + `form_fields`) or JSON (`json_model`)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": IMAGE_FIELD, **form_fields},
                    },
                },
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{json_model}"},
                    "examples": json_examples,
                },
            },
        }
    }
