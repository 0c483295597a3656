"""The framework floor: a bare FastAPI endpoint that parses the same multipart upload and returns a constant."""

from typing import Annotated

from fastapi import FastAPI, File, UploadFile

app = FastAPI()


@app.post("/predict")
async def predict(image: Annotated[UploadFile, File()]) -> dict[str, int]:
    await image.read()
    return {"label": 7}
