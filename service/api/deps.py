"""Request dependencies: settings, readiness and models from the lifespan state, and request bodies that come
either as multipart/form-data (a file `image` plus fields) or as JSON (the image as base64)."""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar, cast

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import BaseModel, ValidationError

from service.admission import Admission, ByteBudget
from service.api.forms import parse_form
from service.batching import MicroBatcher
from service.classifiers import Registry
from service.config import Settings
from service.errors import LimitExceededError, UnauthorizedError, UnsupportedMediaError
from service.readiness import Readiness
from service.schemas import (
    FeaturemapsJSONRequest,
    FeaturemapsSpec,
    ModelFeaturemapsJSONRequest,
    ModelFeaturemapsSpec,
    PredictJSONRequest,
    PredictOptions,
)

# Cheap dependencies are `async def`: a sync one would cost a hop to the thread pool per request.


async def get_settings(request: Request) -> Settings:
    return cast(Settings, request.state.settings)


async def get_readiness(request: Request) -> Readiness:
    return cast(Readiness, request.state.readiness)


async def get_registry(request: Request) -> Registry:
    return cast(Registry, request.state.registry)


SettingsDep = Annotated[Settings, Depends(get_settings)]
ReadinessDep = Annotated[Readiness, Depends(get_readiness)]
RegistryDep = Annotated[Registry, Depends(get_registry)]

# The two ways to send a key, published in the OpenAPI document on every route that needs one (see
# `service.main`); `require_api_key` reads them itself: one dependency instead of three on every request.
API_KEY_SCHEMES = (
    APIKeyHeader(name="X-API-Key", auto_error=False, description="One of FEATUREMAP_API_KEYS."),
    HTTPBearer(auto_error=False, description="One of FEATUREMAP_API_KEYS, as a bearer token."),
)


def _bearer_token(authorization: str | None) -> str | None:
    scheme, credentials = get_authorization_scheme_param(authorization)
    return credentials if authorization and scheme.lower() == "bearer" and credentials else None


async def require_api_key(request: Request) -> None:
    """When API keys are configured, the request must carry one (`X-API-Key` or `Authorization: Bearer`)."""
    settings = cast(Settings, request.state.settings)
    if not settings.api_keys:
        return
    given = request.headers.get("x-api-key") or _bearer_token(request.headers.get("authorization"))
    if not given:
        raise UnauthorizedError("this endpoint needs an API key: send X-API-Key or Authorization: Bearer")
    offered = given.encode("latin-1")  # the header's own bytes (Starlette reads them as latin-1); keys are UTF-8
    # Compare with every key, always, in constant time each: timing tells nothing about which key or how close.
    matches = [hmac.compare_digest(offered, key.encode()) for key in settings.api_keys]
    if not any(matches):
        raise UnauthorizedError("the API key is not valid")


async def get_compute(request: Request) -> Admission:
    return cast(Admission, request.state.admission)


@dataclass(frozen=True)
class Runtime:
    """What a compute route needs from the lifespan, as one dependency (each costs FastAPI time per request)."""

    settings: Settings
    registry: Registry
    compute: Admission
    batcher: MicroBatcher[Any, Any]


async def get_runtime(request: Request) -> Runtime:
    state = request.state
    return Runtime(state.settings, state.registry, state.admission, state.batcher)


async def get_response_budget(request: Request) -> ByteBudget:
    return cast(ByteBudget, request.state.responses)


ApiKeyDep = Depends(require_api_key)
ComputeDep = Annotated[Admission, Depends(get_compute)]
ResponseBudgetDep = Annotated[ByteBudget, Depends(get_response_budget)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

SpecT = TypeVar("SpecT", bound=BaseModel)


@dataclass(frozen=True)
class ImagePayload(Generic[SpecT]):
    """An uploaded image's bytes and the spec that came with it, whichever encoding the client used."""

    image: bytes
    spec: SpecT


def field_error(field: str | tuple[str | int, ...], msg: str, kind: str = "value_error") -> RequestValidationError:
    loc = (field,) if isinstance(field, str) else field
    return RequestValidationError([{"loc": loc, "msg": msg, "type": kind}])


_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w.+-]+=[\w.+-]+)*;base64,", re.IGNORECASE)


def decode_base64_image(value: str, field: str | tuple[str | int, ...] = "image") -> bytes:
    """Base64 (standard or URL-safe alphabet, or a `data:` URL) -> bytes; a 422 pointing at `field` otherwise."""
    text = _DATA_URL.sub("", value.strip(), count=1)
    text = "".join(text.split()).replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise field_error(field, "is not valid base64") from None


def _validate(model: type[SpecT], raw: str | bytes | dict[str, Any], strict: bool | None = None) -> SpecT:
    try:
        if isinstance(raw, dict):
            return model.model_validate(raw, strict=strict)
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False)) from None


def _body_kind(request: Request) -> str:
    content_type = encoding = None
    for name, value in request.scope["headers"]:  # both in one pass over the busiest route's headers (ASGI: lowercase)
        if name == b"content-type" and content_type is None:
            content_type = value
        elif name == b"content-encoding" and encoding is None:
            encoding = value
    if encoding is not None and encoding.strip().lower() != b"identity":  # the bytes would be read as they came
        named = encoding.decode("latin-1")
        raise UnsupportedMediaError(f"Content-Encoding {named!r} is not supported here; send the body as it is")
    ctype = (content_type or b"").split(b";")[0].strip().lower().decode("latin-1")
    if ctype == "multipart/form-data":
        return "multipart"
    if ctype == "application/json" or ctype.endswith("+json"):
        return "json"
    raise UnsupportedMediaError(
        f"send multipart/form-data (a file field 'image') or application/json; got {ctype or 'no Content-Type'}"
    )


async def _read_form(request: Request, fields: tuple[str, ...]) -> tuple[bytes, dict[str, str]]:
    """The file `image` and the text of the other allowed `fields` (a field sent as a file part is read as text)."""
    allowed = ("image", *fields)
    body = await request.body()
    form = parse_form(request.headers["content-type"], body, max_files=len(allowed), max_fields=len(allowed) + 4)
    unknown = [k for k in form if k not in allowed]
    if unknown:
        raise field_error(unknown[0], f"unknown form field; expected {', '.join(allowed)}")
    upload = form.get("image")
    if upload is None or not upload.is_file:
        raise field_error("image", "a file field named 'image' is required", "missing")
    values = {name: form[name].text() for name in fields if name in form}
    return upload.data, values


async def read_featuremaps_payload(request: Request) -> ImagePayload[FeaturemapsSpec]:
    """multipart: file `image` + optional JSON field `spec`; JSON: the spec's fields + `image` in base64."""
    if _body_kind(request) == "multipart":
        data, values = await _read_form(request, ("spec",))
        return ImagePayload(data, _validate(FeaturemapsSpec, values.get("spec") or "{}"))
    body = _validate(FeaturemapsJSONRequest, await request.body())
    return ImagePayload(decode_base64_image(body.image), body)  # the body is a FeaturemapsSpec too


async def read_model_featuremaps_payload(request: Request) -> ImagePayload[ModelFeaturemapsSpec]:
    """As for /v1/featuremaps, with the model's spec (output options, preprocess, device)."""
    if _body_kind(request) == "multipart":
        data, values = await _read_form(request, ("spec",))
        return ImagePayload(data, _validate(ModelFeaturemapsSpec, values.get("spec") or "{}"))
    body = _validate(ModelFeaturemapsJSONRequest, await request.body())
    return ImagePayload(decode_base64_image(body.image), body)


DigitInput = bytes | list[list[float]]  # an encoded image file, or 28x28 pixel values


@dataclass(frozen=True)
class PredictPayload:
    options: PredictOptions
    inputs: list[tuple[tuple[str | int, ...], DigitInput]]  # (field it came from, input), in order
    batch: bool


_PREDICT_FIELDS = tuple(PredictOptions.model_fields)


async def read_predict_payload(request: Request) -> PredictPayload:
    """multipart: file `image` + form fields; JSON: exactly one of `image`, `pixels` or `images` (a batch)."""
    settings = cast(Settings, request.state.settings)
    if _body_kind(request) == "multipart":
        data, values = await _read_form(request, _PREDICT_FIELDS)
        return PredictPayload(_validate(PredictOptions, dict(values), strict=False), [(("image",), data)], False)
    body = _validate(PredictJSONRequest, await request.body())
    given = [name for name in ("image", "pixels", "images") if getattr(body, name) is not None]
    if len(given) != 1:
        where = given[1] if len(given) > 1 else "image"
        raise field_error(where, "send exactly one of image (base64), pixels (28x28) or images (a batch)")
    options: PredictOptions = body  # a PredictJSONRequest is PredictOptions plus the inputs
    if body.image is not None:
        return PredictPayload(options, [(("image",), decode_base64_image(body.image))], False)
    if body.pixels is not None:
        return PredictPayload(options, [(("pixels",), body.pixels)], False)
    images = body.images or []
    if len(images) > settings.max_batch:
        raise LimitExceededError(f"the batch has {len(images)} images; the limit is {settings.max_batch}", ("images",))
    inputs: list[tuple[tuple[str | int, ...], DigitInput]] = [
        (("images", i), decode_base64_image(item, ("images", i)) if isinstance(item, str) else item)
        for i, item in enumerate(images)
    ]
    return PredictPayload(options, inputs, True)


FeaturemapsPayloadDep = Annotated[ImagePayload[FeaturemapsSpec], Depends(read_featuremaps_payload)]
ModelFeaturemapsPayloadDep = Annotated[ImagePayload[ModelFeaturemapsSpec], Depends(read_model_featuremaps_payload)]
