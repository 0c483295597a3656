"""NVIDIA's own Open Inference Protocol client, tritonclient.http, against the real server: health, metadata,
inference with JSON and binary tensors, and its error messages; the answers are /v1/predict's."""

from __future__ import annotations

from collections.abc import Iterator

import httpx2 as httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.datasets import load_mnist
from tests.e2e.test_server import wait_ready

pytestmark = pytest.mark.e2e

TEST = load_mnist("test")
DIGITS = TEST.images[:16]  # (16, 28, 28) uint8
UNIT = (DIGITS.astype(np.float32) / np.float32(255))[:, None]  # (16, 1, 28, 28) in [0, 1]


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[triton.InferenceServerClient]:
    with httpx.Client(base_url=base_url, timeout=30) as http:
        wait_ready(http)
    with triton.InferenceServerClient(base_url.removeprefix("http://"), network_timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def v1_answers(base_url: str) -> dict[str, tuple[list[int], np.ndarray]]:
    """/v1/predict's labels and probabilities for DIGITS, per model, with `preprocess: "none"`."""
    answers = {}
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for model in ("cnn", "mlp"):
            body = {"model": model, "images": [d.tolist() for d in DIGITS], "preprocess": "none"}
            r = http.post("/v1/predict", json=body)
            assert r.status_code == 200, r.text
            predictions = r.json()["predictions"]
            answers[model] = ([p["label"] for p in predictions], np.asarray([p["probabilities"] for p in predictions]))
    return answers


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("cnn") and client.is_model_ready("mlp", model_version="1")
    assert not client.is_model_ready("resnet") and not client.is_model_ready("cnn", model_version="2")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    meta = client.get_model_metadata("cnn")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("mlp", model_version="1")["versions"] == ["1"]


@pytest.mark.parametrize("model", ["cnn", "mlp"])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_infer_gives_v1_predicts_answers(
    client: triton.InferenceServerClient,
    v1_answers: dict[str, tuple[list[int], np.ndarray]],
    model: str,
    binary: bool,
    datatype: str,
) -> None:
    values = UNIT if datatype == "FP32" else DIGITS
    tensor = triton.InferInput("input", list(values.shape), datatype)
    tensor.set_data_from_numpy(values, binary_data=binary)
    wanted = triton.InferRequestedOutput("probabilities", binary_data=binary)
    result = client.infer(model, [tensor], outputs=[wanted], request_id=f"{model}-{datatype}-{binary}")
    probs = result.as_numpy("probabilities")
    assert probs is not None and probs.dtype == np.float32 and probs.shape == (16, 10)
    labels, v1_probs = v1_answers[model]
    assert probs.argmax(1).tolist() == labels
    np.testing.assert_allclose(probs, v1_probs, rtol=1e-5, atol=1e-7)
    response = result.get_response()
    assert response["id"] == f"{model}-{datatype}-{binary}" and response["model_name"] == model
    assert ("parameters" in response["outputs"][0]) is binary  # binary_data_size only on raw outputs


def test_default_outputs_compressed_request_and_a_version(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("input", [4, 28, 28], "UINT8")
    tensor.set_data_from_numpy(DIGITS[:4])
    result = client.infer("cnn", [tensor], model_version="1", request_compression_algorithm="gzip")
    probs = result.as_numpy("probabilities")  # no outputs named: tritonclient asks for all, as raw bytes
    assert probs is not None and probs.argmax(1).tolist() == TEST.labels[:4].tolist()


@pytest.mark.parametrize(
    ("model", "name", "datatype", "values", "outputs", "status", "message"),
    [
        ("cnn", "input", "FP32", UNIT[:1], "logits", "400", "outputs[0].name: unknown output 'logits'; the model has one output, 'probabilities'"),
        ("cnn", "image", "FP32", UNIT[:1], None, "400", "inputs[0].name: unknown input 'image'; the model has one input, 'input'"),
        ("cnn", "input", "FP32", UNIT[:1] * 255, None, "400", "inputs[0].data: element [0, 0, 7, 6] is 84.0; FP32 values must be finite"),
        ("cnn", "input", "FP64", UNIT[:1].astype(np.float64), None, "400", "inputs[0].datatype: datatype 'FP64' is not accepted"),
        ("cnn", "input", "FP32", np.zeros((65, 1, 28, 28), np.float32), None, "413", "the batch has 65 digits; the limit is 64"),
        ("resnet", "input", "FP32", UNIT[:1], None, "404", "unknown model 'resnet'; models: cnn, mlp"),
    ],
)  # fmt: skip
def test_errors_reach_the_client_as_our_message(
    client: triton.InferenceServerClient,
    model: str,
    name: str,
    datatype: str,
    values: np.ndarray,
    outputs: str | None,
    status: str,
    message: str,
) -> None:
    tensor = triton.InferInput(name, list(values.shape), datatype)
    tensor.set_data_from_numpy(values)
    wanted = [triton.InferRequestedOutput(outputs)] if outputs else None
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, [tensor], outputs=wanted)
    assert caught.value.status() == status
    assert message in caught.value.message()
