"""The Open Inference Protocol (KServe v2) for the MNIST models: /v2, health, model metadata, infer."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
