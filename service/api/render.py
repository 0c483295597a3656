"""Pipeline results -> HTTP bodies: stage objects with base64 PNGs or float32 tensors, or one montage PNG."""

from __future__ import annotations

import base64
import weakref
from collections.abc import Callable
from typing import Any, Self, TypeVar

import numpy as np
import orjson
import torch
from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service import imaging
from service.admission import ByteBudget
from service.classifiers import Prediction
from service.deadline import Deadline
from service.deadline import check as check_deadline
from service.devices import to_host
from service.pipeline import PipelineResult, StageResult
from service.schemas import (
    ConvFilters,
    DigitPrediction,
    FeaturemapsResponse,
    FilterInfo,
    InputInfo,
    OutputOptions,
    PredictOptions,
    PreprocessingInfo,
    StageOutput,
    TopK,
)


def _stage_output(
    stage: StageResult, output: OutputOptions, value_range: float, deadline: Deadline | None
) -> StageOutput:
    maps = stage.maps
    c, h, w = stage.plan.shape
    fields: dict[str, Any] = {
        "index": stage.plan.index,
        "op": stage.plan.op,
        "shape": [c, h, w],
        "channels": list(stage.plan.channels),
        "min": stage.lo,
        "max": stage.hi,
    }
    if output.format == "json" and output.tensor_encoding == "base64":
        values = to_host(maps.to(torch.float16 if output.dtype == "float16" else torch.float32))
        fields["data_base64"] = base64.b64encode(values.astype(values.dtype.newbyteorder("<")).tobytes()).decode()
        fields["dtype"] = output.dtype
    elif output.format == "json":
        fields["data"] = np.ascontiguousarray(to_host(maps))  # (C, H, W) float32, serialised exactly by orjson
    else:
        levels = imaging.to_levels(maps, output.scale, value_range, (stage.lo, stage.hi))
        fields["map_ranges"] = [[lo, hi] for lo, hi in zip(levels.lo, levels.hi, strict=True)]
        check_deadline(deadline, f"encoding the maps of stage {stage.plan.index}")
        pngs = imaging.encode_pngs([imaging.colorize(lv, output.colormap) for lv in levels.levels])
        fields["maps"] = [base64.b64encode(png).decode("ascii") for png in pngs]
    return StageOutput.model_construct(**fields)


def featuremaps_response(
    result: PipelineResult, output: OutputOptions, value_range: float, deadline: Deadline | None = None
) -> FeaturemapsResponse:
    """The JSON response; `data` stays a numpy array until serialisation (see `json_response`)."""
    c, h, w = result.input_shape
    return FeaturemapsResponse.model_construct(
        device=str(result.device),
        input=InputInfo(height=h, width=w, channels=c),
        filters=[
            ConvFilters.model_construct(
                stage=i, filters=[FilterInfo.model_construct(name=f.name, kernel=f.kernel.tolist()) for f in filters]
            )
            for i, filters in result.filters.items()
        ],
        stages=[_stage_output(s, output, value_range, deadline) for s in result.stages],
    )


def montage_response(result: PipelineResult, output: OutputOptions, value_range: float) -> SlicedResponse:
    rows = []
    for stage in result.stages:
        c, h, w = stage.plan.shape
        levels = imaging.to_levels(stage.maps, output.scale, value_range, (stage.lo, stage.hi))
        rows.append(
            imaging.MontageRow(
                title=f"stage {stage.plan.index}: {stage.plan.op}  {c}x{h}x{w}",
                maps=[
                    (label, imaging.colorize(lv, output.colormap))
                    for label, lv in zip(stage.plan.channels, levels.levels, strict=True)
                ],
            )
        )
    return SlicedResponse(imaging.montage(rows), media_type="image/png")


def _default(obj: object) -> object:
    if isinstance(obj, BaseModel):
        return {k: v for k, v in obj.__dict__.items() if v is not None}
    if isinstance(obj, torch.Tensor):
        return obj.cpu().numpy()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def json_response(model: BaseModel, status_code: int = 200) -> SlicedResponse:
    """orjson straight from the model: numpy float32 arrays come out as their shortest exact decimals."""
    body = orjson.dumps(model, default=_default, option=orjson.OPT_SERIALIZE_NUMPY)
    return SlicedResponse(body, status_code=status_code, media_type="application/json")


class SlicedResponse(Response):
    """A response whose body, when large, is handed to the server in slices of `SLICE` bytes (same bytes, same
    Content-Length). Handed over whole, what the socket does not take at once is copied (twice, in Python 3.11's
    asyncio) into a fresh write buffer of nearly the body's size; in slices, the server's flow control waits for
    each to drain, so at most about a slice is ever buffered. Sending a 34 MB JSON body took 15 ms (13-16)
    against 32 ms (22-53) whole, alternated in one server on 2 cores.

    A large body stays in memory until the client has taken its last slice, so `hold` counts it against the
    worker's budget for responses until then (or until the response is dropped unsent)."""

    SLICE = 1024 * 1024
    _release: Callable[[], object] | None = None

    def hold(self, budget: ByteBudget) -> Self:
        """Count a body over `SLICE` against `budget` while this response lives or until it has been sent;
        OverloadedError (503) when it does not fit. A smaller body is the server's write buffer's to bound."""
        size = len(self.body)
        if size > self.SLICE:
            budget.take(size)
            self._release = weakref.finalize(self, budget.give_back, size)  # runs once: sent, or dropped unsent
        return self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._send(scope, receive, send)
        finally:
            if self._release is not None:
                self._release()

    async def _send(self, scope: Scope, receive: Receive, send: Send) -> None:
        body, size = self.body, len(self.body)
        if scope["type"] != "http" or size <= self.SLICE or self.background is not None:
            await super().__call__(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for start in range(0, size, self.SLICE):
            end = start + self.SLICE
            await send({"type": "http.response.body", "body": body[start:end], "more_body": end < size})


Answer = TypeVar("Answer", bound=DigitPrediction)


def digit_prediction(
    prediction: Prediction,
    options: PredictOptions,
    schema: type[Answer],
    **fields: str,
) -> Answer:
    """One digit's answer as `schema`: a `DigitPrediction`, or a `PredictResponse` with its `model` and `device` in
    `fields`, built and validated once (not built as the one, dumped and validated again as the other)."""
    p = prediction.probabilities
    digit = prediction.preprocessed
    image = None
    if options.include_input:
        pixels = np.rint(digit.pixels * 255).astype(np.uint8)
        image = base64.b64encode(imaging.encode_png(pixels)).decode("ascii")
    return schema(
        **fields,
        label=prediction.label,
        confidence=float(p[prediction.label]),
        probabilities=[float(v) for v in p],
        top_k=[TopK(label=label, probability=prob) for label, prob in prediction.top_k(options.top_k)],
        preprocessing=PreprocessingInfo(mode=digit.mode, steps=list(digit.steps)),
        input_image=image,
    )


def wants_png(accept: str | None) -> bool:
    """True when the client prefers image/png to JSON (q-values honoured; wildcards mean JSON)."""
    best: tuple[float, bool] = (-1.0, False)
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if media.lower() == "image/png" and q > best[0]:
            best = (q, True)
        elif media.lower() in ("application/json", "application/*", "*/*") and q >= best[0]:
            best = (q, False)
    return best[1] and best[0] > 0
