"""A tutorial-style FastAPI app serving the same shipped CNN: what a user would write from a blog post."""

import io
from typing import Annotated

import numpy as np
import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from service.classifiers import load_classifier

app = FastAPI()
model = load_classifier("cnn").on(torch.device("cpu"))


@app.post("/predict")
def predict(image: Annotated[UploadFile, File()]) -> dict[str, object]:
    img = Image.open(io.BytesIO(image.file.read())).convert("L").resize((28, 28))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).reshape(1, 1, 28, 28)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)[0]
    return {"label": int(probs.argmax()), "probabilities": probs.tolist()}
