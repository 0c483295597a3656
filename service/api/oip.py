"""The Open Inference Protocol (KServe v2) for the MNIST models, so that Triton, KServe and Seldon clients work
unchanged: /v2 (server metadata), health, model metadata and readiness, and inference with JSON tensors or the
binary tensor data extension. Errors are problem+json with an `error` member, the field those clients read."""

from __future__ import annotations

import copy
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Path, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.responses import Response

from service import __version__, oip
from service.api.deps import ApiKeyDep, ReadinessDep, RegistryDep, Runtime, RuntimeDep
from service.api.docs import PROBLEM_JSON, problem_responses
from service.classifiers import MODEL_NAMES, Classifier, Registry
from service.config import Settings
from service.devices import resolve_device
from service.errors import InferenceRequestError, UnknownModelError
from service.oip_schemas import (
    ONE_UINT8,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelReadiness,
    ServerLiveness,
    ServerMetadata,
    ServerReadiness,
    TensorMetadata,
)
from service.readiness import Readiness

# Problem bodies on /v2 also carry `error` (the detail again): what tritonclient and KServe clients show.
OIP_PROBLEM: dict[str, Any] = {
    "allOf": [
        {"$ref": "#/components/schemas/Problem"},
        {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string", "description": "The `detail`, for Open Inference clients."}},
        },
    ]
}


def _problems(*statuses: int, described: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """As `problem_responses`, with the `error` member documented and, where given, this API's own wording."""
    responses = problem_responses(*statuses)
    for status, response in responses.items():
        response["content"][PROBLEM_JSON]["schema"] = OIP_PROBLEM
        response["description"] = (described or {}).get(int(status), response["description"])
    return responses


router = APIRouter(prefix="/v2", tags=["open inference protocol"])
# Included by the app beside `router`, not into it: a route of a router included into another keeps its own path
# ("/models/{name}/infer"), which the metrics and the access log would then show without "/v2".
models_router = APIRouter(
    prefix="/v2/models",
    tags=["open inference protocol"],
    dependencies=[ApiKeyDep],
    responses=_problems(401, 404, 422, 503, described={404: "No such model or version"}),
)

ModelName = Annotated[str, Path(description="`cnn` or `mlp`.", examples=["cnn"])]
ModelVersion = Annotated[str, Path(description=f"`{oip.VERSION}`, the one version served.", examples=[oip.VERSION])]


@router.get("", response_model=ServerMetadata)
async def get_server_metadata() -> ServerMetadata:
    """The server's name, version and protocol extensions."""
    return ServerMetadata(name="featuremap-service", version=__version__, extensions=list(oip.EXTENSIONS))


@router.get("/health/live", response_model=ServerLiveness)
async def check_server_liveness() -> ServerLiveness:
    """200 while the process is alive."""
    return ServerLiveness(live=True)


@router.get(
    "/health/ready",
    response_model=ServerReadiness,
    responses={503: {"model": ServerReadiness, "description": "Starting up, shutting down, or the models failed"}},
)
async def check_server_readiness(readiness: ReadinessDep) -> JSONResponse:
    """200 once the models are loaded and warm (as /readyz); 503 before, and while stopping."""
    return JSONResponse({"ready": readiness.ready}, status_code=200 if readiness.ready else 503)


def _served(registry: Registry, name: str, version: str | None) -> Classifier:
    classifier = registry.get(name)
    if version is not None and version != oip.VERSION:
        raise UnknownModelError(f"model {name!r} has no version {version[:32]!r}; versions: {oip.VERSION}")
    return classifier


def _metadata(classifier: Classifier) -> ModelMetadata:
    return ModelMetadata(
        name=classifier.name,
        versions=[oip.VERSION],
        platform=oip.PLATFORM,
        inputs=[TensorMetadata(name=oip.INPUT, datatype="FP32", shape=[-1, *oip.INPUT_FORMS["FP32"].tail])],
        outputs=[TensorMetadata(name=oip.OUTPUT, datatype="FP32", shape=[-1, oip.CLASSES])],
    )


_METADATA_DOC = (
    "The input `input` is FP32 `[N, 1, 28, 28]` with values in [0, 1]; UINT8 `[N, 28, 28]` (pixels 0..255) is "
    "accepted too. The output `probabilities` is FP32 `[N, 10]`."
)


@models_router.get("/{name}", response_model=ModelMetadata, description=_METADATA_DOC)
async def get_model_metadata(name: ModelName, registry: RegistryDep) -> ModelMetadata:
    """A model's versions, platform, input and output tensors."""
    return _metadata(_served(registry, name, None))


@models_router.get("/{name}/versions/{version}", response_model=ModelMetadata, description=_METADATA_DOC)
async def get_model_version_metadata(name: ModelName, version: ModelVersion, registry: RegistryDep) -> ModelMetadata:
    """A model version's metadata (the same as the model's: one version is served)."""
    return _metadata(_served(registry, name, version))


_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"model": ModelReadiness, "description": "Starting up or shutting down"}
}


def _model_readiness(name: str, version: str | None, readiness: Readiness, registry: Registry) -> JSONResponse:
    if name not in MODEL_NAMES:  # known before the models load, so this answers 404 or 503, never a 500
        raise UnknownModelError(f"unknown model {name!r}; models: {', '.join(MODEL_NAMES)}")
    if version is not None and version != oip.VERSION:
        raise UnknownModelError(f"model {name!r} has no version {version[:32]!r}; versions: {oip.VERSION}")
    ready = readiness.ready and registry.loaded
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


@models_router.get("/{name}/ready", response_model=ModelReadiness, responses=_READY_RESPONSES)
async def check_model_readiness(name: ModelName, readiness: ReadinessDep, registry: RegistryDep) -> JSONResponse:
    """200 when the model can serve (the server is ready); 503 while starting or stopping."""
    return _model_readiness(name, None, readiness, registry)


@models_router.get("/{name}/versions/{version}/ready", response_model=ModelReadiness, responses=_READY_RESPONSES)
async def check_model_version_readiness(
    name: ModelName, version: ModelVersion, readiness: ReadinessDep, registry: RegistryDep
) -> JSONResponse:
    """200 when the model version can serve; 503 while starting or stopping."""
    return _model_readiness(name, version, readiness, registry)


# --- inference ----------------------------------------------------------------------------------------------------

INFER_DOC = f"""Classify digits: the input tensor `input` is FP32 `[N, 1, 28, 28]` with values in [0, 1] (pixels / 255),
or UINT8 `[N, 28, 28]` with pixels 0..255 (scaled by 1/255), white digit on black, N up to `FEATUREMAP_MAX_BATCH`;
the output `probabilities` is FP32 `[N, 10]`, the same as `/v1/predict` gives with `preprocess: "none"`.

`data` holds the elements in row-major order, flat or nested. FP32 values outside [0, 1], NaN or infinities are
refused (400), not clipped.

**Binary tensor data extension** (as Triton): send the JSON request, then the tensor's raw little-endian bytes,
with the header `{oip.HEADER_LENGTH}` set to the JSON part's length and `parameters.binary_data_size` on the
input instead of `data`. Ask for raw output bytes with `parameters.binary_data: true` on the output or
`parameters.binary_data_output: true` on the request; the response is then `application/octet-stream`: its
first `{oip.HEADER_LENGTH}` bytes are the JSON response (`binary_data_size` on the output), then the bytes.
A body may be sent with `Content-Encoding: gzip` or `deflate`.

Errors are problem+json with `error` (the detail, which tritonclient shows); `errors[0].field` names the
request field at fault (`inputs[0].shape`)."""

INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The probabilities: JSON, or with binary outputs the JSON head followed by raw bytes.",
        "content": {
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "example": '{"model_name":"cnn","model_version":"1","outputs":[{"name":"probabilities",'
                '"datatype":"FP32","shape":[1,10],"parameters":{"binary_data_size":40}}]}<40 bytes>',
            }
        },
    },
    **_problems(
        400,
        408,
        413,
        415,
        504,
        described={
            400: "The inference request is malformed or does not fit the model (name, datatype, shape, data, sizes)",
            413: "The body, or N over FEATUREMAP_MAX_BATCH",
            415: "A Content-Encoding other than gzip or deflate",
        },
    ),
}

REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": f"An inference request; with `{oip.HEADER_LENGTH}`, its JSON head followed by raw bytes.",
        "content": {
            "application/json": {
                "schema": InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}"),
                "examples": {
                    "uint8": {
                        "summary": "One digit, UINT8 pixels 0..255, nested rows (FP32 [1, 1, 28, 28] reads the same)",
                        "value": {
                            "id": "a-1",
                            "inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8", "data": ONE_UINT8}],
                            "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}],
                        },
                    },
                },
            }
        },
    }
}


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """pydantic's `$defs` inlined: the request body is parsed by hand, so its models are not in `components`."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.rsplit("/", 1)[-1] in defs:
                return resolve(copy.deepcopy(defs[ref.rsplit("/", 1)[-1]]))
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    result: dict[str, Any] = resolve(schema)
    return result


REQUEST_BODY["requestBody"]["content"]["application/json"]["schema"] = _inline_defs(
    REQUEST_BODY["requestBody"]["content"]["application/json"]["schema"]
)

HeaderLength = Annotated[
    str | None,
    Header(
        alias=oip.HEADER_LENGTH,
        description="Binary tensor data extension: the length in bytes of the body's JSON part; tensor bytes follow.",
        examples=["120"],
    ),
]


async def _infer(
    name: str, version: str | None, request: Request, runtime: Runtime, header_length: str | None
) -> Response:
    """Read the whole body (the middleware bounds its size and time), then do everything else on the pool."""
    classifier = _served(runtime.registry, name, version)
    body = await request.body()
    encoding = request.headers.get("content-encoding")
    return await runtime.compute.run(_run_inference, classifier, body, encoding, header_length, runtime.settings)


@models_router.post(
    "/{name}/infer",
    response_model=InferenceResponse,
    responses=INFER_RESPONSES,
    description=INFER_DOC,
    openapi_extra=copy.deepcopy(REQUEST_BODY),  # FastAPI merges it in place
)
async def run_inference(
    name: ModelName, request: Request, runtime: RuntimeDep, header_length: HeaderLength = None
) -> Response:
    """Classify a batch of 28x28 digits: `input` in, `probabilities` out."""
    return await _infer(name, None, request, runtime, header_length)


@models_router.post(
    "/{name}/versions/{version}/infer",
    response_model=InferenceResponse,
    responses=INFER_RESPONSES,
    description=INFER_DOC,
    openapi_extra=copy.deepcopy(REQUEST_BODY),
)
async def run_model_version_inference(
    name: ModelName, version: ModelVersion, request: Request, runtime: RuntimeDep, header_length: HeaderLength = None
) -> Response:
    """Classify a batch of digits with a given model version."""
    return await _infer(name, version, request, runtime, header_length)


def _parse(header: bytes) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate_json(header)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_context=False)
        first = errors[0]
        loc = tuple(first["loc"])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        if first["type"] == "json_invalid":
            raise InferenceRequestError(f"the request is not valid JSON: {first['msg']}") from None
        if not loc:
            raise InferenceRequestError(f"the inference request: {first['msg']}") from None
        raise InferenceRequestError(f"{first['msg']}{more}", loc) from None


def _run_inference(
    classifier: Classifier, body: bytes, encoding: str | None, header_length: str | None, settings: Settings
) -> Response:
    """The work, on a compute thread: unframe and check the request, run the model, frame the response."""
    header, binary = oip.split_body(oip.inflate(body, encoding, settings.max_body_bytes), header_length)
    request = _parse(header)
    inputs = [oip.InputTensor(t.name, t.datatype, t.shape, t.parameters or {}, t.data) for t in request.inputs]
    outputs = [oip.OutputRequest(o.name, o.parameters or {}) for o in request.outputs or ()]
    batch = oip.read_input(inputs, binary, settings.max_batch)
    binary_output = oip.wants_binary(outputs, request.parameters or {})
    probabilities = classifier.probabilities_of(batch.numpy(), resolve_device("auto"))  # as /v1/predict's
    head: dict[str, Any] = {"model_name": classifier.name, "model_version": oip.VERSION}
    if request.id is not None:
        head["id"] = request.id
    output: dict[str, Any] = {"name": oip.OUTPUT, "datatype": "FP32", "shape": list(probabilities.shape)}
    if binary_output:
        raw = probabilities.astype("<f4").tobytes()
        output["parameters"] = {"binary_data_size": len(raw)}
        head["outputs"] = [output]
        json_part = orjson.dumps(head)
        headers = {oip.HEADER_LENGTH: str(len(json_part))}
        return Response(json_part + raw, media_type="application/octet-stream", headers=headers)
    output["data"] = probabilities.ravel()  # float32: orjson writes the shortest decimals that read back exactly
    head["outputs"] = [output]
    return Response(orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")
