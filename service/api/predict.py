"""POST /v1/predict (and /predict): classify a digit, or a batch of digits, with the MLP or the CNN."""

from __future__ import annotations

import copy
from typing import Any

import torch
from fastapi import APIRouter, Request
from starlette.responses import Response

from service import classifiers, imaging
from service.api import render
from service.api.deps import ApiKeyDep, PredictPayload, get_runtime, read_predict_payload
from service.api.docs import image_request_body, problem_responses
from service.api.routing import DirectRoute
from service.classifiers import MNIST_SIZE
from service.config import Settings
from service.deadline import Deadline
from service.devices import resolve_device
from service.errors import format_loc
from service.schemas import ONE_PIXELS, BatchPredictResponse, DigitPrediction, PredictOptions, PredictResponse

_ERRORS = problem_responses(400, 401, 408, 413, 415, 422, 503, 504)
router = APIRouter(prefix="/v1", tags=["predict"], dependencies=[ApiKeyDep], responses=_ERRORS)
unversioned = APIRouter(tags=["predict"], dependencies=[ApiKeyDep], responses=_ERRORS)

REQUEST_BODY = image_request_body(
    PredictOptions.model_json_schema()["properties"],
    "PredictJSONRequest",
    {
        "image": {"summary": "A picture, base64", "value": {"model": "cnn", "image": "iVBORw0KGgo..."}},
        "pixels": {"summary": "28x28 pixel values", "value": {"model": "mlp", "pixels": ONE_PIXELS}},
        "batch": {"summary": "A batch", "value": {"images": ["iVBORw0KGgo...", "iVBORw0KGgo..."]}},
    },
)
RESPONSES: dict[int | str, dict[str, Any]] = {200: {"description": "One prediction, or `predictions` for a batch."}}


async def predict_digit(request: Request) -> Response:
    """Classify a digit (or a batch): label, confidence, the ten probabilities, and the top k."""
    # The busiest route reads its payload and runtime itself, not as `PredictPayloadDep` and `RuntimeDep`: FastAPI
    # solves each dependency anew on every request, and these two cost about 25 µs of the loop's time a request
    # (in-process, against 195 µs for the framework floor's whole request). Their OpenAPI is the same: neither
    # adds a parameter, and the body is documented by `REQUEST_BODY`.
    payload = await read_predict_payload(request)
    runtime = await get_runtime(request)
    classifier = runtime.registry.get(payload.options.model, loc=("model",))
    settings = runtime.settings
    if payload.batch or settings.batch_max_size < 2:
        result = await runtime.compute.run(_predict, payload, classifier, settings)
    else:  # concurrent single predictions for the same model on the same device share one forward pass
        # The device is resolved once, here: however a client names it ("auto", "cuda", "cuda:0"), its predictions
        # batch with the others', and a device that is not here is refused before the request takes a place in a queue.
        device = resolve_device(payload.options.device)
        result = await runtime.batcher.submit((classifier.name, str(device)), (payload, classifier, settings, device))
    # Built by our own code from validated parts: serialised once with orjson, not re-validated by FastAPI.
    return render.json_response(result)


PredictJob = tuple[PredictPayload, classifiers.Classifier, Settings, torch.device]  # the device its batch runs on


def predict_many(jobs: list[PredictJob]) -> list[PredictResponse | Exception]:
    """One micro-batch, on a compute thread (or the event loop, for a lone light job: `is_light`): each job's digit
    is prepared on its own (its errors are its own), then one forward pass serves them all. The jobs share model and
    device (the batcher's key)."""
    _, classifier, _, device = jobs[0]
    prepared: list[classifiers.Preprocessed | Exception] = []
    for payload, _, settings, _ in jobs:
        try:
            [(loc, value)] = payload.inputs
            prepared.append(
                classifiers.prepare_digit(value, payload.options.preprocess, settings.max_image_pixels, loc)
            )
        except Exception as e:  # a client error (4xx) or a bug (500): either way, only this request's
            prepared.append(e)
    digits = [d for d in prepared if not isinstance(d, Exception)]
    predictions = iter(classifier.predict(digits, device) if digits else [])
    where = {"model": classifier.name, "device": str(device)}
    results: list[PredictResponse | Exception] = []
    for (payload, *_), item in zip(jobs, prepared, strict=True):
        if isinstance(item, Exception):
            results.append(item)
            continue
        results.append(render.digit_prediction(next(predictions), payload.options, PredictResponse, **where))
    return results


# A lone prediction whose input is at most this big may run on the event loop (`MicroBatcher`'s `inline`): 28x28
# pixel values, or a plain PNG (`imaging.plain_png_size`) of at most 64x64 pixels in at most 16 KiB. The most such
# a file's decoding and MNIST preprocessing took here was 1.0-1.6 ms (64x64 RGBA noise, half of it transparent),
# where a 28x28 digit took 0.17 ms; a 256x256 one took 3-6 ms, and goes to a compute thread.
INLINE_MAX_BYTES = 16 * 1024
INLINE_MAX_PIXELS = 64 * 64


def is_light(job: PredictJob) -> bool:
    """Whether a single-digit job is small enough to run on the event loop: pixel values or a small plain PNG, on the
    CPU (a GPU's work stays on the compute threads, where its streams and contexts live)."""
    payload, _, _, device = job
    [(_, value)] = payload.inputs
    if device.type != "cpu":
        return False
    if not isinstance(value, bytes):  # 28x28 values (the rest are refused, on a compute thread)
        return len(value) == MNIST_SIZE and all(len(row) == MNIST_SIZE for row in value)
    if len(value) > INLINE_MAX_BYTES:  # first: the chunks of no larger file are walked
        return False
    size = imaging.plain_png_size(value)
    return size is not None and size[0] * size[1] <= INLINE_MAX_PIXELS


def _predict(
    payload: PredictPayload, classifier: classifiers.Classifier, settings: Settings
) -> PredictResponse | BatchPredictResponse:
    """The work, on a compute thread: preprocess each digit, run the net once on the batch."""
    deadline = Deadline.after(settings.compute_timeout_s)  # a batch of large images takes a second or more each
    options = payload.options
    device = resolve_device(options.device)
    digits = []
    for loc, value in payload.inputs:
        deadline.check(f"preparing {format_loc(loc)}")
        digits.append(classifiers.prepare_digit(value, options.preprocess, settings.max_image_pixels, loc))
    deadline.check("preparing the last digit")
    predictions = classifier.predict(digits, device)
    if payload.batch:
        answers = [render.digit_prediction(p, options, DigitPrediction) for p in predictions]
        return BatchPredictResponse(model=classifier.name, device=str(device), predictions=answers)
    return render.digit_prediction(predictions[0], options, PredictResponse, model=classifier.name, device=str(device))


for _router, _name in ((router, "predict_digit"), (unversioned, "predict_digit_unversioned")):
    _router.add_api_route(
        "/predict",
        predict_digit,
        methods=["POST"],
        name=_name,
        response_model=PredictResponse | BatchPredictResponse,
        responses=RESPONSES,
        openapi_extra=copy.deepcopy(REQUEST_BODY),  # FastAPI merges it in place
        summary="Predict Digit" + (" (unversioned alias of /v1/predict)" if router is not _router else ""),
        route_class_override=DirectRoute,  # the busiest route: no FastAPI handler between the guard and the endpoint
    )
