"""Request dependencies: settings and readiness from the lifespan state, and the featuremaps request body."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Annotated, Any, cast

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from service.config import Settings
from service.errors import UnsupportedMediaError
from service.readiness import Readiness
from service.schemas import FeaturemapsJSONRequest, FeaturemapsSpec


def get_settings(request: Request) -> Settings:
    return cast(Settings, request.state.settings)


def get_readiness(request: Request) -> Readiness:
    return cast(Readiness, request.state.readiness)


SettingsDep = Annotated[Settings, Depends(get_settings)]
ReadinessDep = Annotated[Readiness, Depends(get_readiness)]


@dataclass(frozen=True)
class ImagePayload:
    """An uploaded image's bytes and the spec that came with it, whichever encoding the client used."""

    image: bytes
    spec: FeaturemapsSpec


def _field_error(field: str, msg: str, kind: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"loc": (field,), "msg": msg, "type": kind}])


_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w.+-]+=[\w.+-]+)*;base64,", re.IGNORECASE)


def decode_base64_image(value: str, field: str = "image") -> bytes:
    """Base64 (standard or URL-safe alphabet, or a `data:` URL) -> bytes; a 422 pointing at `field` otherwise."""
    text = _DATA_URL.sub("", value.strip(), count=1)
    text = "".join(text.split()).replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _field_error(field, "is not valid base64") from None


def _validate(model: type[FeaturemapsSpec], raw: str | bytes) -> Any:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False)) from None


_FORM_FIELDS = ("image", "spec")


async def read_image_payload(request: Request) -> ImagePayload:
    """`multipart/form-data` (file `image`, optional JSON `spec`) or `application/json` (`image` as base64)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        async with request.form(max_files=2, max_fields=8) as form:
            unknown = [k for k in form if k not in _FORM_FIELDS]
            if unknown:
                raise _field_error(unknown[0], f"unknown form field; expected {' and '.join(_FORM_FIELDS)}")
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise _field_error("image", "a file field named 'image' is required", "missing")
            data = await upload.read()
            raw_spec = form.get("spec")
            if isinstance(raw_spec, UploadFile):  # curl -F spec=@spec.json sends it as a file
                raw_spec = (await raw_spec.read()).decode("utf-8", errors="replace")
        return ImagePayload(data, _validate(FeaturemapsSpec, raw_spec or "{}"))
    if ctype == "application/json" or ctype.endswith("+json"):
        body = _validate(FeaturemapsJSONRequest, await request.body())
        return ImagePayload(decode_base64_image(body.image), body)  # the body is a FeaturemapsSpec too
    raise UnsupportedMediaError(
        f"send multipart/form-data (a file field 'image') or application/json; got {ctype or 'no Content-Type'}"
    )


ImagePayloadDep = Annotated[ImagePayload, Depends(read_image_payload)]
