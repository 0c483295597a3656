"""The benchmark's baseline apps answer as the bench assumes: the floor a constant, the tutorial app and the bound
the service's label for the same upload, the bound with the service's own answer to the last digit."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from bench.serve import digit_png
from tests.conftest import make_client


@pytest.fixture(scope="module")
def upload() -> dict[str, tuple[str, bytes, str]]:
    return {"image": ("digit.png", digit_png(), "image/png")}


@pytest.fixture(scope="module")
def service_answer(upload: dict[str, tuple[str, bytes, str]]) -> dict[str, object]:
    with make_client() as client:
        response = client.post("/v1/predict", files=upload)
    assert response.status_code == 200
    answer: dict[str, object] = response.json()
    assert answer["label"] == 7  # MNIST's first test digit: the floor's constant is the right answer
    return answer


@pytest.fixture
def keep_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()  # the bound sets one torch thread for its process, as a server would
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("keep_torch_threads")
@pytest.mark.parametrize(
    ("app", "expected"),
    [
        ("bench.apps.floor", lambda service: {"label": 7}),
        ("bench.apps.tutorial", lambda service: {"label": service["label"]}),
        ("bench.apps.bound", lambda service: service),
    ],
)
def test_each_baseline_answers_as_the_bench_assumes(app: str, expected, upload, service_answer) -> None:  # type: ignore[no-untyped-def]
    with TestClient(importlib.import_module(app).app) as client:
        response = client.post("/predict", files=upload)
    assert response.status_code == 200
    answer = response.json()
    wanted = expected(service_answer)
    assert {key: answer[key] for key in wanted} == wanted
