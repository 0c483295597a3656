"""The served models: their cards and layers, and the trained CNN's own feature maps for an image."""

from __future__ import annotations

import copy
from typing import Annotated

from fastapi import APIRouter, Header, Path
from starlette.responses import Response

from service import classifiers
from service.api import render
from service.api.deps import (
    ApiKeyDep,
    ComputeDep,
    ImagePayload,
    ModelFeaturemapsPayloadDep,
    RegistryDep,
    SettingsDep,
)
from service.api.docs import image_request_body, problem_responses
from service.config import Settings
from service.deadline import Deadline
from service.devices import resolve_device
from service.schemas import (
    DigitPrediction,
    ModelCard,
    ModelFeaturemapsResponse,
    ModelFeaturemapsSpec,
    ModelList,
    PredictOptions,
)

router = APIRouter(
    prefix="/v1/models", tags=["models"], dependencies=[ApiKeyDep], responses=problem_responses(401, 404, 503)
)

# Not held to the `model` field's pattern: any name but a served one is a 404 (unknown-model), as on /v2.
ModelName = Annotated[str, Path(examples=["cnn"], description="A served model: see /v1/models.")]

REQUEST_BODY = image_request_body(
    {
        "spec": {
            "type": "string",
            "description": "ModelFeaturemapsSpec as a JSON string (output, preprocess, device).",
            "example": '{"output": {"stages": [0, 1, 2]}}',
        }
    },
    "ModelFeaturemapsJSONRequest",
    {
        "first_block": {
            "summary": "The first conv block as PNGs",
            "value": {"image": "iVBORw0KGgo...", "output": {"stages": [0, 1, 2]}},
        }
    },
)


@router.get("", response_model=ModelList)
def list_models(registry: RegistryDep) -> ModelList:
    """List the served models with their cards (accuracy, weights' SHA-256, training) and layers."""
    return ModelList(models=[ModelCard.model_validate(registry.get(name).card) for name in registry.names()])


@router.get("/{name}", response_model=ModelCard)
def get_model(name: ModelName, registry: RegistryDep) -> ModelCard:
    """One model's card and its layers with output shapes."""
    return ModelCard.model_validate(registry.get(name).card)


@router.post(
    "/{name}/featuremaps",
    response_model=ModelFeaturemapsResponse,
    responses={**problem_responses(400, 408, 413, 415, 422, 504), 200: {"content": {"image/png": {}}}},
    openapi_extra=copy.deepcopy(REQUEST_BODY),  # FastAPI merges it in place
)
async def compute_model_featuremaps(
    name: ModelName,
    payload: ModelFeaturemapsPayloadDep,
    compute: ComputeDep,
    registry: RegistryDep,
    settings: SettingsDep,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """The trained CNN's activations for a digit, layer by layer, with its prediction and first-layer kernels."""
    classifier = registry.get(name)
    return await compute.run(_model_featuremaps, classifier, payload, settings, render.wants_png(accept))


def _model_featuremaps(
    classifier: classifiers.Classifier, payload: ImagePayload[ModelFeaturemapsSpec], settings: Settings, png: bool
) -> Response:
    """The work, on a compute thread."""
    deadline = Deadline.after(settings.compute_timeout_s)
    spec = payload.spec
    device = resolve_device(spec.device)
    digit = classifiers.prepare_digit(payload.image, spec.preprocess, settings.max_image_pixels, ("image",))
    stages = None if spec.output.stages == "all" else spec.output.stages
    result, prediction = classifiers.cnn_featuremaps(classifier, digit, device, stages)
    if png:
        return render.montage_response(result, spec.output, 1.0)
    body = render.featuremaps_response(result, spec.output, 1.0, deadline)
    options = PredictOptions(model=classifier.name, top_k=3, include_input=True)
    return render.json_response(
        ModelFeaturemapsResponse.model_construct(
            **body.__dict__,
            model=classifier.name,
            prediction=render.digit_prediction(prediction, options, DigitPrediction),
        )
    )
