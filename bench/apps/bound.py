"""A yardstick for one client, not a way to serve: the framework floor's endpoint plus this service's own work for
the same upload (decode and MNIST preprocessing, the CNN's serving forward pass on one torch thread, the same JSON
answer), run inline on the event loop. No compute thread, middleware, batching, request id, log line or metric:
what a lone client waits for when a server does this work and nothing else. Inline work blocks every other
request, which is why the service runs it inline only for a lone light prediction (see `service.batching`) and on a
compute thread otherwise; its 16-client figure is one CPU's worth."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import torch
from fastapi import FastAPI, File, UploadFile
from starlette.responses import Response

from service import classifiers
from service.api import render
from service.config import Settings
from service.schemas import PredictOptions, PredictResponse


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    torch.set_num_threads(1)  # as each of the service's compute threads
    yield


app = FastAPI(lifespan=lifespan)
cnn = classifiers.load_classifier("cnn")
cpu = torch.device("cpu")
options = PredictOptions()
max_pixels = Settings().max_image_pixels


def predict_inline(data: bytes) -> PredictResponse:
    digit = classifiers.prepare_digit(data, options.preprocess, max_pixels, ("image",))
    [prediction] = cnn.predict([digit], cpu)
    return render.digit_prediction(prediction, options, PredictResponse, model="cnn", device="cpu")


@app.post("/predict")
async def predict(image: Annotated[UploadFile, File()]) -> Response:
    return render.json_response(predict_inline(await image.read()))
