"""HTTP models of the Open Inference Protocol (KServe v2) routes: the inference request and response, server and
model metadata, health. They check a body's structure; `service.oip` checks what it means for the model."""

from __future__ import annotations

from typing import Annotated, Any, cast

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from service.schemas import ONE_PIXELS

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_INT64_MAX = 2**63 - 1

Parameters = Annotated[
    dict[str, Any],
    Field(
        description="Protocol parameters: string, number or boolean values.",
        json_schema_extra={"additionalProperties": {"type": ["string", "number", "boolean"]}},
    ),
]
Shape = Annotated[list[Annotated[int, Field(ge=0, le=_INT64_MAX)]], Field(max_length=8)]

ONE_UINT8 = cast(JsonValue, [ONE_PIXELS])  # (1, 28, 28): the same "1", pixels 0..255


class RequestInput(BaseModel):
    """`$request_input`: the tensor `input`, with JSON `data` or, in the binary extension, `binary_data_size`."""

    model_config = _STRICT

    # The enums document what the model takes; `service.oip` checks them, with messages that say what fits.
    name: str = Field(
        max_length=256, description="`input`, the model's one input.", json_schema_extra={"enum": ["input"]}
    )
    shape: Shape = Field(examples=[[1, 1, 28, 28]], description="FP32 `[N, 1, 28, 28]` or UINT8 `[N, 28, 28]`.")
    datatype: str = Field(
        max_length=16,
        description="`FP32` (values in [0, 1], pixels / 255) or `UINT8` (pixels 0..255); white digit on black.",
        json_schema_extra={"enum": ["FP32", "UINT8"]},
    )
    parameters: Parameters | None = Field(
        None, description="`binary_data_size`: the tensor's bytes follow the JSON header (binary extension)."
    )
    data: list[Any] | None = Field(
        None, description="The elements in row-major order, flat or nested; absent with `binary_data_size`."
    )


class RequestOutput(BaseModel):
    """`$request_output`: `probabilities`, as JSON or (`binary_data: true`) as raw bytes."""

    model_config = _STRICT

    name: str = Field(max_length=256, json_schema_extra={"enum": ["probabilities"]})
    parameters: Parameters | None = Field(None, description="`binary_data`: true for raw little-endian bytes.")


class InferenceRequest(BaseModel):
    """`$inference_request`. With `Inference-Header-Content-Length` this is the body's JSON head only."""

    model_config = _STRICT

    id: str | None = Field(None, max_length=256, description="Echoed in the response.")
    parameters: Parameters | None = Field(
        None, description="`binary_data_output`: true for every output as raw bytes unless it says otherwise."
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(None, description="Absent: every output (there is one).")


class ResponseOutput(BaseModel):
    """`$response_output`: `data` as JSON, or `parameters.binary_data_size` bytes after the JSON header."""

    name: str = Field(examples=["probabilities"])
    datatype: str = Field(examples=["FP32"])
    shape: list[int] = Field(examples=[[1, 10]])
    parameters: Parameters | None = None
    data: list[float] | None = Field(None, description="`[N, 10]` probabilities, flat, row-major; rows sum to 1.")


class InferenceResponse(BaseModel):
    """`$inference_response`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_name": "cnn",
                    "model_version": "1",
                    "id": "a-1",
                    "outputs": [
                        {
                            "name": "probabilities",
                            "datatype": "FP32",
                            "shape": [1, 10],
                            "data": [0.0, 0.9993, 0.0001, 0.0, 0.0002, 0.0, 0.0, 0.0003, 0.0001, 0.0],
                        }
                    ],
                }
            ]
        }
    )

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class ServerMetadata(BaseModel):
    """`$metadata_server_response`."""

    name: str = Field(examples=["featuremap-service"])
    version: str = Field(examples=["0.1.0"])
    extensions: list[str] = Field(examples=[["binary_tensor_data"]])


class TensorMetadata(BaseModel):
    """`$metadata_tensor`: -1 stands for N, the batch size."""

    name: str = Field(examples=["input"])
    datatype: str = Field(examples=["FP32"])
    shape: list[int] = Field(examples=[[-1, 1, 28, 28]])


class ModelMetadata(BaseModel):
    """`$metadata_model_response`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "cnn",
                    "versions": ["1"],
                    "platform": "pytorch",
                    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
                    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
                }
            ]
        }
    )

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerLiveness(BaseModel):
    live: bool = Field(examples=[True])


class ServerReadiness(BaseModel):
    ready: bool = Field(examples=[True])


class ModelReadiness(BaseModel):
    name: str = Field(examples=["cnn"])
    ready: bool = Field(examples=[True])
