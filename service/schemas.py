"""HTTP request and response models (pydantic) and their conversion to the core's dataclasses.

Stages are a discriminated union on `op`. Models reject unknown fields, so a typo is a 422, not a silent default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Discriminator, Field, JsonValue, Tag

from service import pipeline

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d{1,3})?)$"
MODEL_PATTERN = r"^[a-z0-9_-]{1,32}$"

KERNEL_EXAMPLE: JsonValue = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]


class InlineFilter(BaseModel):
    """A kernel given as numbers: `kH x kW` (filters each channel) or `C x kH x kW` (sums over channels)."""

    model_config = ConfigDict(
        **_STRICT, json_schema_extra={"examples": [{"name": "my_sobel", "kernel": KERNEL_EXAMPLE}]}
    )

    name: str | None = Field(None, max_length=64, description="Label for the maps; defaults to custom_N.")
    kernel: list[Any] = Field(
        description="Nested list of numbers, 2-D `[kH][kW]` or 3-D `[C][kH][kW]`; finite; sides up to the limit.",
        json_schema_extra={"items": {"type": "array"}},
    )


def _tag_by_type(value: Any) -> str | None:
    """Union tag from the JSON type, so a client sees the error of the branch it meant, not of every branch."""
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "items"
    if isinstance(value, dict):
        return "object"
    return None if value is None else "number"


def _by_type(expected: str) -> Discriminator:
    """A union whose branch the JSON type picks; a value of any other type is refused with `expected`, which says
    what the field takes (pydantic's own message names the tags and this function)."""
    return Discriminator(_tag_by_type, custom_error_type="invalid_type", custom_error_message=expected)


# Tags pydantic puts into error locations; the error handler drops them from field paths. None is also a field's
# name (a filter's `name` is), so the tags are JSON's type names: "string", not "name".
UNION_TAGS = frozenset({"string", "items", "object", "number", "conv", "activation", "leaky_relu", "pool"})

FilterRef = Annotated[
    Annotated[str, Tag("string")] | Annotated[InlineFilter, Tag("object")],
    _by_type("must be a preset name or a {name, kernel} object"),
]


class ConvLayer(BaseModel):
    """Cross-correlation (as `torch.nn.Conv2d` and OpenCV `filter2D`) with preset or inline kernels."""

    model_config = _STRICT

    op: Literal["conv"]
    filters: Annotated[
        Annotated[str, Tag("string")] | Annotated[list[FilterRef], Tag("items")],
        _by_type("must be a bank or preset name, or a list of preset names and {name, kernel} objects"),
    ] = Field(
        description="A bank or preset name (`seed4`), or a list of preset names and `{name, kernel}` objects.",
        examples=["seed4", ["sobel_x", "sobel_y"], [{"name": "edge", "kernel": KERNEL_EXAMPLE}]],
    )
    stride: int = Field(1, ge=1, le=1024)
    padding: Annotated[
        Annotated[Literal["valid", "same"], Tag("string")] | Annotated[int, Field(ge=0, le=1024), Tag("number")],
        _by_type("must be 'valid', 'same' or a number of pixels"),
    ] = Field("valid", description="`valid` (none), `same` (anchored at the kernel centre, as filter2D), or pixels.")
    padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = Field(
        "zeros", description="`reflect` is OpenCV's BORDER_REFLECT_101 (filter2D's default border)."
    )
    bias: (
        Annotated[
            Annotated[float, Tag("number")] | Annotated[list[float], Tag("items")],
            _by_type("must be a number, or a list of one number per filter"),
        ]
        | None
    ) = Field(None, description="Added to each filter's maps: one number for all, or one per filter.")


class ActivationLayer(BaseModel):
    """An element-wise activation."""

    model_config = _STRICT

    op: Literal["relu", "sigmoid", "tanh", "abs"]


class LeakyReluLayer(BaseModel):
    model_config = _STRICT

    op: Literal["leaky_relu"]
    negative_slope: float = Field(0.01, ge=-1e6, le=1e6)


class PoolLayer(BaseModel):
    """Max or average pooling, floor mode; stride defaults to size."""

    model_config = _STRICT

    op: Literal["pool"]
    mode: Literal["max", "avg"] = "max"
    size: int = Field(2, ge=1, le=4096)
    stride: int | None = Field(None, ge=1, le=4096)


def _layer_tag(value: Any) -> str | None:
    op = value.get("op") if isinstance(value, dict) else getattr(value, "op", None)
    if op in ("relu", "sigmoid", "tanh", "abs"):
        return "activation"
    return op if isinstance(op, str) else None


LayerSchema = Annotated[
    Annotated[ConvLayer, Tag("conv")]
    | Annotated[ActivationLayer, Tag("activation")]
    | Annotated[LeakyReluLayer, Tag("leaky_relu")]
    | Annotated[PoolLayer, Tag("pool")],
    Discriminator(
        _layer_tag,
        custom_error_type="invalid_op",
        custom_error_message="op must be one of conv, relu, leaky_relu, sigmoid, tanh, abs, pool",
    ),
]

DEFAULT_LAYERS: list[JsonValue] = [
    {"op": "conv", "filters": "seed4"},
    {"op": "relu"},
    {"op": "pool", "mode": "max", "size": 2},
]


class OutputOptions(BaseModel):
    model_config = _STRICT

    format: Literal["png", "json"] = Field("png", description="`png`: 8-bit PNG per map; `json`: exact float32.")
    stages: Annotated[
        Annotated[Literal["all"], Tag("string")]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=256), Tag("items")],
        _by_type("must be 'all' or a list of stage indices"),
    ] = Field("all", description="`all`, or the indices (into `layers`) of the stages to return, in that order.")
    scale: Literal["per_map", "per_stage", "none"] = Field(
        "per_map",
        description="PNG level range: each map's min..max, the stage's min..max, or the input's 0..1 (0..255).",
    )
    colormap: Literal["gray", "viridis", "magma", "inferno", "plasma", "coolwarm"] = "gray"
    tensor_encoding: Literal["list", "base64"] = Field(
        "list",
        description="JSON format only. `list`: nested `[C][H][W]` numbers in `data`. `base64`: the raw little-endian "
        "bytes, C-order `[C][H][W]`, in `data_base64` with `dtype` (several times smaller and faster to parse).",
    )
    dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="With `tensor_encoding: base64`: float32 (exact) or float16 (half the bytes; about 3 significant "
        "digits; beyond +-65504 becomes +-inf).",
    )


def _default_layers() -> list[ConvLayer | ActivationLayer | LeakyReluLayer | PoolLayer]:
    return [ConvLayer(op="conv", filters="seed4"), ActivationLayer(op="relu"), PoolLayer(op="pool", mode="max", size=2)]


class FeaturemapsSpec(BaseModel):
    """What to run. Every field is optional; the defaults reproduce the tutorial's notebook."""

    model_config = ConfigDict(
        **_STRICT,
        json_schema_extra={
            "examples": [
                {"layers": DEFAULT_LAYERS},
                {
                    "color": "rgb",
                    "layers": [
                        {"op": "conv", "filters": ["sobel_x", "sobel_y"], "padding": "same", "padding_mode": "reflect"},
                        {"op": "relu"},
                    ],
                    "output": {"format": "png", "colormap": "viridis"},
                },
            ]
        },
    )

    color: Literal["gray", "rgb"] = Field("gray", description="`gray`: ITU-R 601-2 luma; `rgb`: channels R, G, B.")
    normalize: Literal["unit", "none"] = Field("unit", description="`unit` divides pixels by 255; `none` keeps 0..255.")
    layers: list[LayerSchema] = Field(
        default_factory=lambda: _default_layers(),
        min_length=1,
        description="Stages, run in order. Default: conv(seed4) -> relu -> max pool 2.",
        json_schema_extra={"default": DEFAULT_LAYERS},
    )
    output: OutputOptions = Field(default_factory=OutputOptions)
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="`auto` uses CUDA when present.")

    def to_pipeline_spec(self) -> pipeline.PipelineSpec:
        """The core's spec; preset names and kernels are resolved here (PipelineSpecError on a bad one)."""
        return pipeline.PipelineSpec(
            color=self.color,
            normalize=self.normalize,
            layers=tuple(_to_layer(layer, i) for i, layer in enumerate(self.layers)),
        )


def _to_layer(layer: Any, i: int) -> pipeline.Layer:
    if isinstance(layer, ConvLayer):
        refs: str | list[str | tuple[str | None, object]] = (
            layer.filters
            if isinstance(layer.filters, str)
            else [f if isinstance(f, str) else (f.name, f.kernel) for f in layer.filters]
        )
        filters = pipeline.resolve_filters(refs, ("layers", i, "filters"))
        bias = layer.bias
        return pipeline.Conv(
            filters=filters,
            stride=layer.stride,
            padding=layer.padding,
            padding_mode=layer.padding_mode,
            bias=(bias,) * len(filters) if isinstance(bias, float | int) else None if bias is None else tuple(bias),
        )
    if isinstance(layer, PoolLayer):
        return pipeline.Pool(mode=layer.mode, size=layer.size, stride=layer.stride)
    if isinstance(layer, LeakyReluLayer):
        return pipeline.Activation("leaky_relu", layer.negative_slope)
    assert isinstance(layer, ActivationLayer)
    return pipeline.Activation(layer.op)


class FeaturemapsJSONRequest(FeaturemapsSpec):
    """`application/json` form of the request: the spec's fields plus the image as base64."""

    model_config = ConfigDict(
        **_STRICT,
        json_schema_extra={"examples": [{"image": "<base64 of dog.jpg>", "layers": DEFAULT_LAYERS}]},
    )

    image: str = Field(
        description="The image file's bytes as base64 (a `data:image/...;base64,` URL also works).",
        min_length=1,
    )


class InputInfo(BaseModel):
    height: int
    width: int
    channels: int


class FilterInfo(BaseModel):
    name: str
    kernel: list[Any] = Field(description="The kernel as applied: `[kH][kW]` or `[C][kH][kW]`.")


class ConvFilters(BaseModel):
    stage: int = Field(description="Index of the conv stage in `layers`.")
    filters: list[FilterInfo]


class StageOutput(BaseModel):
    index: int = Field(description="Index of the stage in `layers`.")
    op: str
    shape: list[int] = Field(description="`[C, H, W]`.")
    channels: list[str] = Field(
        description="One label per map, e.g. `seed_1`, or `sobel_x(R)` for a 2-D kernel on channel R."
    )
    min: float = Field(description="Smallest value in the stage.")
    max: float = Field(description="Largest value in the stage.")
    map_ranges: list[list[float]] | None = Field(
        None,
        description="PNG only: per map `[lo, hi]`; level L stands for lo + (L + 0.5) / 256 * (hi - lo).",
    )
    maps: list[str] | None = Field(None, description="PNG only: one base64 PNG per channel.")
    data: list[Any] | None = Field(None, description="JSON with `tensor_encoding: list`: float32 values `[C][H][W]`.")
    data_base64: str | None = Field(
        None, description="JSON with `tensor_encoding: base64`: little-endian `dtype` values, C-order `[C][H][W]`."
    )
    dtype: Literal["float32", "float16"] | None = Field(None, description="The dtype of `data_base64`.")


SEED_1: JsonValue = [[-1, -1, 1, 1]] * 4
SEEDS: JsonValue = ["seed_1", "seed_2", "seed_3", "seed_4"]


class FeaturemapsResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "device": "cpu",
                    "input": {"height": 300, "width": 300, "channels": 1},
                    "filters": [{"stage": 0, "filters": [{"name": "seed_1", "kernel": SEED_1}]}],
                    "stages": [
                        {
                            "index": 2,
                            "op": "pool",
                            "shape": [4, 148, 148],
                            "channels": SEEDS,
                            "min": 0.0,
                            "max": 3.85098,
                            "map_ranges": [[0.0, 3.85098], [0.0, 3.46667], [0.0, 3.37647], [0.0, 3.14902]],
                            "maps": ["iVBORw0KGgoAAAANSUhEUgAAAJQAAACUCAAAAAB...", "...", "...", "..."],
                        }
                    ],
                }
            ]
        }
    )

    device: str = Field(examples=["cpu"])
    input: InputInfo
    filters: list[ConvFilters]
    stages: list[StageOutput]


class FilterPreset(BaseModel):
    name: str
    kernel: list[list[float]]
    description: str


class FilterBank(BaseModel):
    name: str
    filters: list[str]
    description: str


class FiltersResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "filters": [
                        {"name": "seed_1", "kernel": SEED_1, "description": "Tutorial filter 1: dark left, ..."},
                        {"name": "sobel_x", "kernel": KERNEL_EXAMPLE, "description": "Sobel x-derivative ..."},
                    ],
                    "banks": [
                        {"name": "seed4", "filters": SEEDS, "description": "The tutorial's four 4x4 edge filters."}
                    ],
                }
            ]
        }
    )

    filters: list[FilterPreset]
    banks: list[FilterBank]


class HealthResponse(BaseModel):
    status: Literal["ok", "starting", "stopping", "unavailable"] = Field(examples=["ok"])


class ProblemFieldError(BaseModel):
    field: str = Field(examples=["layers[0].filters[1].kernel"])
    pointer: str = Field(examples=["#/layers/0/filters/1/kernel"])
    detail: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field(examples=["/problems/invalid-spec"])
    title: str = Field(examples=["Invalid pipeline spec"])
    status: int = Field(examples=[422])
    detail: str
    instance: str | None = None
    errors: list[ProblemFieldError] | None = None


# --- MNIST classifiers -----------------------------------------------------------------------------------------

Preprocess = Literal["mnist", "none"]


class PredictOptions(BaseModel):
    """Options of a prediction; in multipart they are form fields beside the file `image`."""

    model_config = _STRICT

    model: str = Field("cnn", pattern=MODEL_PATTERN, description="`cnn` or `mlp` (see /v1/models).")
    top_k: int = Field(3, ge=1, le=10, description="How many of the most likely labels to list.")
    preprocess: Preprocess = Field(
        "mnist",
        description="`mnist`: grayscale, invert a light background, crop, fit 20x20, centre by mass in 28x28 "
        "(for photos and drawings). `none`: the input is already 28x28 MNIST-style (white digit on black).",
    )
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    include_input: bool = Field(False, description="Also return the 28x28 image the model saw, as a base64 PNG.")


PixelRows = Annotated[
    list[list[float]], Field(description="28 rows of 28 numbers: 0..255, or 0..1 when no value exceeds 1.")
]
BatchItem = Annotated[
    Annotated[str, Tag("string")] | Annotated[PixelRows, Tag("items")],
    _by_type("must be a base64-encoded image, or 28 rows of 28 pixel values"),
]


# A "1": a vertical bar 4 px wide, as 28 rows of 0..255.
ONE_PIXELS = cast(JsonValue, [[0] * 28] * 4 + [[0] * 12 + [255] * 4 + [0] * 12] * 20 + [[0] * 28] * 4)


class PredictJSONRequest(PredictOptions):
    """`application/json`: exactly one of `image` (base64 file), `pixels` (28x28) or `images` (a batch)."""

    model_config = ConfigDict(
        **_STRICT,
        json_schema_extra={
            "examples": [
                {"model": "cnn", "image": "iVBORw0KGgoAAAANSUhEUgAA...", "top_k": 3},
                {"model": "mlp", "pixels": ONE_PIXELS},
                {"model": "cnn", "images": ["iVBORw0KGgoAAAANSUhEUgAA...", "iVBORw0KGgoAAAANSUhEUgAA..."]},
            ]
        },
    )

    image: str | None = Field(None, description="The image file's bytes as base64 (or a `data:` URL).")
    pixels: PixelRows | None = None
    images: list[BatchItem] | None = Field(
        None, min_length=1, description="A batch: base64 images and/or 28x28 pixel arrays, answered in order."
    )


class TopK(BaseModel):
    label: int = Field(examples=[7])
    probability: float = Field(examples=[0.998])


class PreprocessingInfo(BaseModel):
    mode: Preprocess
    steps: list[str] = Field(examples=[["grayscale", "inverted (light background)", "centred by mass in 28x28"]])


class DigitPrediction(BaseModel):
    label: int = Field(examples=[7])
    confidence: float = Field(description="The probability of `label`.", examples=[0.998])
    probabilities: list[float] = Field(description="Ten probabilities, for the digits 0..9; they sum to 1.")
    top_k: list[TopK]
    preprocessing: PreprocessingInfo
    input_image: str | None = Field(None, description="With `include_input`: the 28x28 input as a base64 PNG.")


class PredictResponse(DigitPrediction):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "cnn",
                    "device": "cpu",
                    "label": 7,
                    "confidence": 0.9981,
                    "probabilities": [0.0, 0.0002, 0.0011, 0.0001, 0.0, 0.0, 0.0, 0.9981, 0.0, 0.0005],
                    "top_k": [{"label": 7, "probability": 0.9981}, {"label": 2, "probability": 0.0011}],
                    "preprocessing": {"mode": "mnist", "steps": ["grayscale", "centred by mass in 28x28"]},
                }
            ]
        }
    )

    model: str
    device: str


class BatchPredictResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "cnn",
                    "device": "cpu",
                    "predictions": [
                        {
                            "label": 1,
                            "confidence": 0.9993,
                            "probabilities": [0.0, 0.9993, 0.0001, 0.0, 0.0002, 0.0, 0.0, 0.0003, 0.0001, 0.0],
                            "top_k": [{"label": 1, "probability": 0.9993}],
                            "preprocessing": {"mode": "none", "steps": ["grayscale", "scaled to [0, 1]"]},
                        }
                    ],
                }
            ]
        }
    )

    model: str
    device: str
    predictions: list[DigitPrediction] = Field(description="One per input, in order.")


class ModelLayer(BaseModel):
    name: str = Field(examples=["features.0"])
    type: str = Field(examples=["Conv2d"])
    output_shape: list[int] = Field(examples=[[16, 28, 28]])
    parameters: int = Field(examples=[416])


class ModelCard(BaseModel):
    """The model card written by training, plus the layer list."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(examples=["cnn"])
    task: str
    parameters: int = Field(examples=[106890])
    test_accuracy: float = Field(description="On all 10,000 MNIST test images.", examples=[0.9951])
    preprocessing: dict[str, str]
    weights: dict[str, str]
    training: dict[str, Any]
    torch_version: str
    layers: list[ModelLayer]


class ModelList(BaseModel):
    models: list[ModelCard]


class ModelFeaturemapsSpec(BaseModel):
    """What to return of the trained CNN's activations; the image goes through `preprocess` first."""

    model_config = ConfigDict(**_STRICT, json_schema_extra={"examples": [{"output": {"stages": [0, 2]}}]})

    preprocess: Preprocess = "mnist"
    output: OutputOptions = Field(default_factory=OutputOptions)
    device: str = Field("auto", pattern=DEVICE_PATTERN)


class ModelFeaturemapsJSONRequest(ModelFeaturemapsSpec):
    model_config = ConfigDict(
        **_STRICT,
        json_schema_extra={"examples": [{"image": "iVBORw0KGgoAAAANSUhEUgAA...", "output": {"format": "png"}}]},
    )

    image: str = Field(min_length=1, description="The image file's bytes as base64 (or a `data:` URL).")


class ModelFeaturemapsResponse(FeaturemapsResponse):
    model: str
    prediction: DigitPrediction
