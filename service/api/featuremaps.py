"""POST /v1/featuremaps: run a conv/activation/pool pipeline on an uploaded image."""

from __future__ import annotations

import copy
from typing import Annotated

import torch
from fastapi import APIRouter, Header
from starlette.responses import Response

from service import imaging, pipeline
from service.api import render
from service.api.deps import (
    ApiKeyDep,
    ComputeDep,
    FeaturemapsPayloadDep,
    ImagePayload,
    ResponseBudgetDep,
    SettingsDep,
)
from service.api.docs import image_request_body, problem_responses
from service.config import Settings
from service.deadline import Deadline
from service.devices import resolve_device
from service.schemas import DEFAULT_LAYERS, FeaturemapsResponse, FeaturemapsSpec

router = APIRouter(
    prefix="/v1",
    tags=["featuremaps"],
    dependencies=[ApiKeyDep],
    responses=problem_responses(400, 401, 408, 413, 415, 422, 503, 504),
)

_SPEC_EXAMPLE = '{"layers": [{"op": "conv", "filters": "seed4"}, {"op": "relu"}, {"op": "pool", "size": 2}]}'

REQUEST_BODY = image_request_body(
    {
        "spec": {
            "type": "string",
            "description": "The spec as a JSON string (FeaturemapsSpec); omitted = tutorial defaults.",
            "example": _SPEC_EXAMPLE,
        }
    },
    "FeaturemapsJSONRequest",
    {
        "tutorial": {
            "summary": "The tutorial's pipeline (image shortened)",
            "value": {"image": "iVBORw0KGgoAAAANSUhEUgAA...", "layers": DEFAULT_LAYERS},
        },
        "rgb_sobel_json": {
            "summary": "Sobel on each RGB channel, exact tensors back",
            "value": {
                "image": "iVBORw0KGgoAAAANSUhEUgAA...",
                "color": "rgb",
                "layers": [{"op": "conv", "filters": ["sobel_x", "sobel_y"], "padding": "same"}],
                "output": {"format": "json"},
            },
        },
    },
)


@router.post(
    "/featuremaps",
    response_model=FeaturemapsResponse,
    responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}},
    openapi_extra=copy.deepcopy(REQUEST_BODY),  # FastAPI merges it in place
)
async def compute_featuremaps(
    payload: FeaturemapsPayloadDep,
    compute: ComputeDep,
    settings: SettingsDep,
    responses: ResponseBudgetDep,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """Run a pipeline on an image; return each stage's maps as PNGs or float32 tensors (or one montage PNG)."""
    response = await compute.run(_featuremaps, payload, settings, render.wants_png(accept))
    return response.hold(responses)  # a body of hundreds of MB waits in memory for a slow client: bounded


def _featuremaps(payload: ImagePayload[FeaturemapsSpec], settings: Settings, png: bool) -> render.SlicedResponse:
    """The work, on a compute thread: decode, run, encode."""
    deadline = Deadline.after(settings.compute_timeout_s)
    spec = payload.spec.to_pipeline_spec()
    device = resolve_device(payload.spec.device)
    image = imaging.decode_image(payload.image, settings.max_image_pixels)
    output = payload.spec.output
    stages = None if output.stages == "all" else output.stages
    value_range = 1.0 if spec.normalize == "unit" else 255.0
    with torch.inference_mode():
        x = imaging.image_to_tensor(image, spec.color, spec.normalize).to(device)
        result = pipeline.run_pipeline(x, spec, settings.limits(), stages, deadline)
        if png:
            return render.montage_response(result, output, value_range)
        return render.json_response(render.featuremaps_response(result, output, value_range, deadline))
