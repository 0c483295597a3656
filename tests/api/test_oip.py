"""The Open Inference Protocol (KServe v2) routes through TestClient: every endpoint, JSON and binary tensors,
FP32 and UINT8, every refusal, and the same probabilities as /v1/predict."""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.datasets import load_mnist
from service.main import create_app
from tests.api.test_errors import assert_problem
from tests.conftest import make_client

TEST = load_mnist("test")
DIGITS = TEST.images[:8]  # (8, 28, 28) uint8
LABELS = TEST.labels[:8].tolist()
UNIT = (DIGITS.astype(np.float32) / np.float32(255))[:, None]  # (8, 1, 28, 28) in [0, 1], as ToTensor gives
HEADER = "Inference-Header-Content-Length"
URL = "/v2/models/cnn/infer"


def tensor(datatype: str = "FP32", n: int = 1, data: Any = None, **fields: Any) -> dict[str, Any]:
    """An `input` tensor holding the first n test digits, flat (or `data` as given)."""
    if data is None:
        data = UNIT[:n].ravel().tolist() if datatype == "FP32" else DIGITS[:n].ravel().tolist()
    shape = [n, 1, 28, 28] if datatype == "FP32" else [n, 28, 28]
    return {"name": "input", "shape": shape, "datatype": datatype, "data": data, **fields}


def request(*inputs: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"inputs": list(inputs or [tensor()]), **fields}


def binary(head: dict[str, Any], raw: bytes, header_length: int | str | None = None) -> dict[str, Any]:
    """TestClient kwargs for the binary extension: JSON head, raw bytes, and the header giving the head's length."""
    js = json.dumps(head).encode()
    return {"content": js + raw, "headers": {HEADER: str(len(js) if header_length is None else header_length)}}


def binary_input(datatype: str = "FP32", n: int = 1, size: int | None = None, **head: Any) -> dict[str, Any]:
    values = UNIT[:n] if datatype == "FP32" else DIGITS[:n]
    raw = values.astype("<f4" if datatype == "FP32" else "u1").tobytes()
    t = tensor(datatype, n, parameters={"binary_data_size": len(raw) if size is None else size})
    del t["data"]
    return binary({"inputs": [t], **head}, raw)


def outputs(body: dict[str, Any]) -> np.ndarray:
    [out] = body["outputs"]
    assert out["name"] == "probabilities" and out["datatype"] == "FP32"
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def unframe(r: Any) -> tuple[dict[str, Any], np.ndarray]:
    """A binary response: its JSON head and the probabilities that follow it."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers[HEADER])
    head = json.loads(r.content[:n])
    [out] = head["outputs"]
    assert "data" not in out and out["parameters"]["binary_data_size"] == len(r.content) - n
    return head, np.frombuffer(r.content[n:], "<f4").reshape(out["shape"])


def v1_probabilities(client: TestClient, model: str, digits: np.ndarray) -> np.ndarray:
    images = [d.tolist() for d in digits]
    r = client.post("/v1/predict", json={"model": model, "images": images, "preprocess": "none"})
    assert r.status_code == 200, r.text
    return np.asarray([p["probabilities"] for p in r.json()["predictions"]], np.float32)


# --- metadata and health ------------------------------------------------------------------------------------------


def test_server_metadata_liveness_and_readiness(client: TestClient) -> None:
    assert client.get("/v2").json() == {
        "name": "featuremap-service",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }
    assert client.get("/v2/health/live").json() == {"live": True}
    r = client.get("/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}


@pytest.mark.parametrize("model", ["cnn", "mlp"])
@pytest.mark.parametrize("versioned", [False, True])
def test_model_metadata_and_readiness(client: TestClient, model: str, versioned: bool) -> None:
    base = f"/v2/models/{model}" + ("/versions/1" if versioned else "")
    assert client.get(base).json() == {
        "name": model,
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
    }
    r = client.get(f"{base}/ready")
    assert r.status_code == 200 and r.json() == {"name": model, "ready": True}


def test_not_ready_while_the_models_load(held_warm_up: threading.Event) -> None:
    with TestClient(create_app(Settings(warmup=True))) as c:
        assert c.get("/v2/health/live").status_code == 200
        r = c.get("/v2/health/ready")
        assert r.status_code == 503 and r.json() == {"ready": False}
        r = c.get("/v2/models/cnn/ready")
        assert r.status_code == 503 and r.json() == {"name": "cnn", "ready": False}
        assert c.get("/v2/models/resnet/ready").status_code == 404
        r = c.post(URL, json=request())
        assert_problem(r, 503, "models-loading", None, "loading")
        assert r.headers["retry-after"] == "1" and r.json()["error"] == r.json()["detail"]
        held_warm_up.set()
        assert c.app_state["readiness"].wait(30)
        assert c.get("/v2/health/ready").status_code == c.get("/v2/models/mlp/ready").status_code == 200
        assert c.post(URL, json=request()).status_code == 200


# --- inference ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_the_same_probabilities_as_v1_predict(client: TestClient, model: str) -> None:
    r = client.post(f"/v2/models/{model}/infer", json=request(tensor("FP32", 8)))
    assert r.status_code == 200, r.text
    probs = outputs(r.json())
    assert probs.shape == (8, 10) and probs.argmax(1).tolist() == LABELS
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    # The same inputs, batch and computation (`Classifier.probabilities_of`): the same float32 values, to the bit.
    np.testing.assert_array_equal(probs, v1_probabilities(client, model, DIGITS))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(request(tensor("FP32", 8)), id="FP32 flat"),
        pytest.param(request(tensor("FP32", 8, UNIT.tolist())), id="FP32 nested"),
        pytest.param(request(tensor("FP32", 8, UNIT.reshape(8, -1).tolist())), id="FP32 partly nested"),
        pytest.param(request(tensor("UINT8", 8)), id="UINT8 flat"),
        pytest.param(request(tensor("UINT8", 8, DIGITS.tolist())), id="UINT8 nested"),
    ],
)
def test_json_tensors_flat_or_nested_fp32_or_uint8_read_alike(client: TestClient, body: dict[str, Any]) -> None:
    r = client.post(URL, json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    expected = outputs(client.post(URL, json=request(tensor("FP32", 8))).json())
    np.testing.assert_array_equal(outputs(r.json()), expected)  # UINT8 / 255 is exactly the FP32 input


@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_binary_inputs_read_as_their_json_form(client: TestClient, datatype: str) -> None:
    r = client.post(URL, **binary_input(datatype, 8))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    assert HEADER.lower() not in r.headers
    np.testing.assert_array_equal(
        outputs(r.json()), outputs(client.post(URL, json=request(tensor(datatype, 8))).json())
    )


@pytest.mark.parametrize(
    ("params", "outs", "binary_out"),
    [
        ({}, None, False),
        ({"binary_data_output": True}, None, True),
        ({}, [{"name": "probabilities", "parameters": {"binary_data": True}}], True),
        ({"binary_data_output": True}, [{"name": "probabilities", "parameters": {"binary_data": False}}], False),
        ({"binary_data_output": False}, [{"name": "probabilities"}], False),
        ({"binary_data_output": True}, [], True),
    ],
)
def test_outputs_come_back_as_json_or_raw_bytes_as_asked(
    client: TestClient, params: dict[str, Any], outs: list[dict[str, Any]] | None, binary_out: bool
) -> None:
    body = request(tensor("FP32", 3), parameters=params, **({"outputs": outs} if outs is not None else {}))
    r = client.post(URL, json=body)
    expected = outputs(client.post(URL, json=request(tensor("FP32", 3))).json())
    if binary_out:
        head, probs = unframe(r)
        assert head["model_name"] == "cnn" and head["outputs"][0]["shape"] == [3, 10]
        np.testing.assert_array_equal(probs, expected)  # JSON floats read back exactly
    else:
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        np.testing.assert_array_equal(outputs(r.json()), expected)


def test_binary_in_and_out_with_id_echoed(client: TestClient) -> None:
    kwargs = binary_input("UINT8", 5, id="req-42", parameters={"binary_data_output": True})
    head, probs = unframe(client.post("/v2/models/mlp/infer", **kwargs))
    assert head == {
        "model_name": "mlp",
        "model_version": "1",
        "id": "req-42",
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [5, 10], "parameters": {"binary_data_size": 200}}
        ],
    }
    assert probs.argmax(1).tolist() == LABELS[:5]


def test_id_is_echoed_and_absent_when_not_sent(client: TestClient) -> None:
    assert client.post(URL, json=request(id="abc")).json()["id"] == "abc"
    assert "id" not in client.post(URL, json=request()).json()


def test_versioned_inference(client: TestClient) -> None:
    r = client.post("/v2/models/cnn/versions/1/infer", json=request(tensor("UINT8", 2)))
    assert r.status_code == 200 and r.json()["model_version"] == "1"
    assert outputs(r.json()).argmax(1).tolist() == LABELS[:2]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "gzip, two members"])
def test_compressed_request_bodies(client: TestClient, encoding: str) -> None:
    kwargs = binary_input("FP32", 2)
    if encoding == "gzip, two members":  # as `cat a.gz b.gz` makes: RFC 1952's members, one after the other
        encoding, half = "gzip", len(kwargs["content"]) // 2
        kwargs["content"] = gzip.compress(kwargs["content"][:half]) + gzip.compress(kwargs["content"][half:])
    else:
        kwargs["content"] = (gzip.compress if encoding == "gzip" else zlib.compress)(kwargs["content"])
    kwargs["headers"]["Content-Encoding"] = encoding
    r = client.post(URL, **kwargs)
    assert r.status_code == 200, r.text
    assert outputs(r.json()).argmax(1).tolist() == LABELS[:2]


def test_the_batch_limit_is_the_service_setting() -> None:
    with make_client(max_batch=3) as small:
        assert small.post(URL, json=request(tensor("UINT8", 3))).status_code == 200
        r = small.post(URL, json=request(tensor("UINT8", 4)))
        assert_problem(r, 413, "limit-exceeded", "inputs[0].shape[0]", "limit is 3")
        assert r.json()["error"] == r.json()["detail"]


def test_model_routes_need_the_api_key_and_health_does_not() -> None:
    with make_client(api_keys=["k1"]) as c:
        for path in ("/v2", "/v2/health/live", "/v2/health/ready"):
            assert c.get(path).status_code == 200
        r = c.get("/v2/models/cnn")
        assert_problem(r, 401, "unauthorized", None, "API key")
        assert r.json()["error"] == r.json()["detail"]
        assert c.post(URL, json=request()).status_code == 401
        assert c.post(URL, json=request(), headers={"X-API-Key": "k1"}).status_code == 200
        assert c.get("/v2/models/cnn/ready", headers={"Authorization": "Bearer k1"}).status_code == 200


# --- refusals -------------------------------------------------------------------------------------------------------

NAN_BODY = json.dumps(request(tensor("FP32", data=[0.5] * 784))).replace("0.5", "NaN", 1)
INF_BODY = json.dumps(request(tensor("FP32", data=[0.5] * 784))).replace("0.5", "-Infinity", 1)
BIG_BODY = json.dumps(request(tensor("FP32", data=[0.5] * 784))).replace("0.5", "1e400", 1)
HUGE_INT_BODY = json.dumps(request(tensor("FP32", data=[0.5] * 784))).replace("0.5", "9" * 400, 1)
DEEP_BODY = json.dumps(request(tensor("FP32", data=[]))).replace("[]", "[" * 5000 + "]" * 5000)
NAN_BYTES = np.full(784, np.nan, "<f4").tobytes()
ONE_RAW = UNIT[:1].astype("<f4").tobytes()


def with_input(datatype: str = "FP32", data: Any = None, **fields: Any) -> dict[str, Any]:
    return {"json": request(tensor(datatype, 1, data, **fields))}


def binary_head(**input_fields: Any) -> dict[str, Any]:
    t = {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", **input_fields}
    return {"inputs": [t]}


SIZED = {"parameters": {"binary_data_size": 3136}}

# (id, request kwargs, status, problem type, field of the error or None, fragment of the detail)
# fmt: off
INFER_ERRORS: list[tuple[str, dict[str, Any], int, str, str | None, str]] = [
    ("not JSON", {"content": b"{oops"}, 400, "invalid-inference-request", None, "not valid JSON"),
    ("empty body", {"content": b""}, 400, "invalid-inference-request", None, "not valid JSON"),
    ("JSON array", {"json": [1]}, 400, "invalid-inference-request", None, "the inference request: Input should be an object"),
    ("no inputs field", {"json": {"id": "x"}}, 400, "invalid-inference-request", "inputs", "Field required"),
    ("unknown field", {"json": request(extra=1)}, 400, "invalid-inference-request", "extra", "Extra inputs"),
    ("id not a string", {"json": request(id=7)}, 400, "invalid-inference-request", "id", "valid string"),
    ("no inputs", {"json": {"inputs": []}}, 400, "invalid-inference-request", "inputs", "no inputs"),
    ("unknown input", {"json": request(tensor(name="image"))}, 400, "invalid-inference-request", "inputs[0].name", "unknown input 'image'"),
    ("input twice", {"json": request(tensor(), tensor())}, 400, "invalid-inference-request", "inputs[1]", "given 2 times"),
    ("FP64", with_input(datatype="FP64"), 400, "invalid-inference-request", "inputs[0].datatype", "FP32 [N, 1, 28, 28]"),
    ("BYTES", with_input(datatype="BYTES"), 400, "invalid-inference-request", "inputs[0].datatype", "UINT8 [N, 28, 28]"),
    ("FP32 without the channel", with_input(shape=[1, 28, 28]), 400, "invalid-inference-request", "inputs[0].shape", "FP32 takes [N, 1, 28, 28]"),
    ("UINT8 with a channel", with_input(datatype="UINT8", shape=[1, 1, 28, 28]), 400, "invalid-inference-request", "inputs[0].shape", "UINT8 takes [N, 28, 28]"),
    ("flat 784", with_input(shape=[1, 784]), 400, "invalid-inference-request", "inputs[0].shape", "does not fit"),
    ("N is 0", with_input(shape=[0, 1, 28, 28], data=[]), 400, "invalid-inference-request", "inputs[0].shape[0]", "1 or more"),
    ("N over the limit", with_input(shape=[65, 1, 28, 28], data=[0]), 413, "limit-exceeded", "inputs[0].shape[0]", "limit is 64"),
    ("N astronomically large", with_input(shape=[2**63 - 1, 1, 28, 28], data=[0]), 413, "limit-exceeded", "inputs[0].shape[0]", "limit is 64"),
    ("N beyond int64", with_input(shape=[2**63, 1, 28, 28], data=[0]), 400, "invalid-inference-request", "inputs[0].shape[0]", "less than or equal to"),
    ("negative dimension", with_input(shape=[-1, 1, 28, 28]), 400, "invalid-inference-request", "inputs[0].shape[0]", "greater than or equal to 0"),
    ("fractional dimension", with_input(shape=[1.5, 1, 28, 28]), 400, "invalid-inference-request", "inputs[0].shape[0]", "valid integer"),
    ("nine dimensions", with_input(shape=[1] * 9), 400, "invalid-inference-request", "inputs[0].shape", "at most 8"),
    ("data too short", with_input(data=[0.5] * 783), 400, "invalid-inference-request", "inputs[0].data", "has 783 elements; its shape takes 784"),
    ("data too long", with_input(data=[[0.5] * 784, [0.5]]), 400, "invalid-inference-request", "inputs[0].data", "more than the 784"),
    ("data not a list", with_input(data=0.5), 400, "invalid-inference-request", "inputs[0].data", "valid array"),
    ("a string element", with_input(data=[0.5] * 5 + ["a"] + [0.5] * 778), 400, "invalid-inference-request", "inputs[0].data", "element 5 (row-major) is 'a'"),
    ("a boolean element", with_input(data=[True] * 784), 400, "invalid-inference-request", "inputs[0].data", "element 0 (row-major) is True"),
    ("an object element", with_input(data=[{}] * 784), 400, "invalid-inference-request", "inputs[0].data", "is dict"),
    ("a null element", with_input(data=[None] * 784), 400, "invalid-inference-request", "inputs[0].data", "is None"),
    ("FP32 pixel 0..255", with_input(data=DIGITS[0].ravel().tolist()), 400, "invalid-inference-request", "inputs[0].data", "element [0, 0, 7, 6] is 84.0; FP32 values must be finite and in [0, 1]"),
    ("FP32 negative", with_input(data=[-0.1] + [0.5] * 783), 400, "invalid-inference-request", "inputs[0].data", "element [0, 0, 0, 0] is -0.1"),
    ("FP32 just over 1", with_input(data=[0.5] * 783 + [1.0000001]), 400, "invalid-inference-request", "inputs[0].data", "element [0, 0, 27, 27] is 1.0000001"),
    ("FP32 NaN", {"content": NAN_BODY}, 400, "invalid-inference-request", "inputs[0].data", "is nan"),
    ("FP32 -Infinity", {"content": INF_BODY}, 400, "invalid-inference-request", "inputs[0].data", "is -inf"),
    ("FP32 1e400", {"content": BIG_BODY}, 400, "invalid-inference-request", "inputs[0].data", "is inf"),
    ("FP32 400-digit integer", {"content": HUGE_INT_BODY}, 400, "invalid-inference-request", "inputs[0].data", "too large"),
    ("UINT8 256", with_input(datatype="UINT8", data=[256] * 784), 400, "invalid-inference-request", "inputs[0].data", "UINT8 data must be integers 0..255"),
    ("UINT8 negative", with_input(datatype="UINT8", data=[-1] * 784), 400, "invalid-inference-request", "inputs[0].data", "is -1"),
    ("UINT8 float", with_input(datatype="UINT8", data=[1.0] * 784), 400, "invalid-inference-request", "inputs[0].data", "is 1.0"),
    ("nesting too deep", {"content": DEEP_BODY}, 400, "invalid-inference-request", None, "recursion limit"),
    ("no data", {"json": binary_head()}, 400, "invalid-inference-request", "inputs[0]", "has no data"),
    ("data and binary_data_size", binary(binary_head(data=[0] * 784, **SIZED), ONE_RAW), 400, "invalid-inference-request", "inputs[0].data", "not both"),
    ("binary_data_size without the header", {"json": binary_head(**SIZED)}, 400, "invalid-inference-request", "inputs[0].parameters.binary_data_size", "needs the Inference-Header-Content-Length header"),
    ("binary_data_size negative", binary(binary_head(parameters={"binary_data_size": -1}), ONE_RAW), 400, "invalid-inference-request", "inputs[0].parameters.binary_data_size", "byte count"),
    ("binary_data_size a string", binary(binary_head(parameters={"binary_data_size": "3136"}), ONE_RAW), 400, "invalid-inference-request", "inputs[0].parameters.binary_data_size", "byte count"),
    ("fewer bytes than binary_data_size", binary(binary_head(**SIZED), ONE_RAW[:-4]), 400, "invalid-inference-request", "inputs[0].parameters.binary_data_size", "3,136 but 3,132 bytes follow"),
    ("more bytes than binary_data_size", binary(binary_head(**SIZED), ONE_RAW + b"\0"), 400, "invalid-inference-request", "inputs[0].parameters.binary_data_size", "3,136 but 3,137 bytes follow"),
    ("binary_data_size not the shape's", binary(binary_head(parameters={"binary_data_size": 784}), ONE_RAW[:784]), 400, "invalid-inference-request", "inputs[0].parameters.binary_data_size", "FP32 [1, 1, 28, 28] takes 3,136"),
    ("bytes but no binary_data_size", binary(request(), ONE_RAW), 400, "invalid-inference-request", "inputs[0]", "3,136 bytes follow the JSON header"),
    ("binary NaN", binary(binary_head(**SIZED), NAN_BYTES), 400, "invalid-inference-request", "inputs[0].data", "is nan"),
    ("header length not a number", binary(request(), b"", "ten"), 400, "invalid-inference-request", None, "must be the JSON header's length"),
    ("header length negative", binary(request(), b"", "-5"), 400, "invalid-inference-request", None, "must be the JSON header's length"),
    ("header length 0", binary(request(), b"", 0), 400, "invalid-inference-request", None, "cannot be empty"),
    ("header length beyond the body", binary(request(), b"", 10**9), 400, "invalid-inference-request", None, "the body has only"),
    ("header length cuts the JSON", binary(request(), b"", 20), 400, "invalid-inference-request", None, "not valid JSON"),
    ("unknown output", {"json": request(outputs=[{"name": "logits"}])}, 400, "invalid-inference-request", "outputs[0].name", "unknown output 'logits'"),
    ("output twice", {"json": request(outputs=[{"name": "probabilities"}] * 2)}, 400, "invalid-inference-request", "outputs[1].name", "requested 2 times"),
    ("binary_data not a boolean", {"json": request(outputs=[{"name": "probabilities", "parameters": {"binary_data": 1}}])}, 400, "invalid-inference-request", "outputs[0].parameters.binary_data", "true or false"),
    ("binary_data_output not a boolean", {"json": request(parameters={"binary_data_output": "yes"})}, 400, "invalid-inference-request", "parameters.binary_data_output", "true or false"),
    ("classification", {"json": request(outputs=[{"name": "probabilities", "parameters": {"classification": 3}}])}, 400, "invalid-inference-request", "outputs[0].parameters.classification", "not supported"),
    ("shared memory", with_input(parameters={"shared_memory_region": "r0"}), 400, "invalid-inference-request", "inputs[0].parameters.shared_memory_region", "shared memory is not supported"),
    ("parameter object", {"json": request(parameters={"headers": {}})}, 400, "invalid-inference-request", "parameters.headers", "string, number or boolean"),
    ("brotli body", {"json": request(), "headers": {"Content-Encoding": "br"}}, 415, "unsupported-media-type", None, "gzip, deflate"),
    ("corrupt gzip", {"content": b"\x1f\x8b not gzip", "headers": {"Content-Encoding": "gzip"}}, 400, "invalid-inference-request", None, "cannot be inflated"),
    ("truncated gzip", {"content": gzip.compress(json.dumps(request()).encode())[:-20], "headers": {"Content-Encoding": "gzip"}}, 400, "invalid-inference-request", None, "truncated"),
    ("gzip, then bytes that are no member", {"content": gzip.compress(json.dumps(request()).encode()) + b"junk", "headers": {"Content-Encoding": "gzip"}}, 400, "invalid-inference-request", None, "cannot be inflated"),
    ("deflate, then more", {"content": zlib.compress(json.dumps(request()).encode()) + b"x", "headers": {"Content-Encoding": "deflate"}}, 400, "invalid-inference-request", None, "bytes after its end"),
    ("gzip of 17 members", {"content": gzip.compress(b"") * 16 + gzip.compress(json.dumps(request()).encode()), "headers": {"Content-Encoding": "gzip"}}, 400, "invalid-inference-request", None, "more than 16 members"),
    ("gzip of 500,000 empty members", {"content": gzip.compress(b"") * 500_000, "headers": {"Content-Encoding": "gzip"}}, 400, "invalid-inference-request", None, "more than 16 members"),
    ("gzip bomb in members", {"content": gzip.compress(b" " * (6 * 1024 * 1024)) * 2, "headers": {"Content-Encoding": "gzip"}}, 413, "limit-exceeded", None, "inflates to over the limit"),
    ("gzip bomb", {"content": gzip.compress(b" " * (11 * 1024 * 1024)), "headers": {"Content-Encoding": "gzip"}}, 413, "limit-exceeded", None, "inflates to over the limit"),
]
# fmt: on


@pytest.mark.parametrize(
    ("kwargs", "status", "kind", "field", "fragment"), [c[1:] for c in INFER_ERRORS], ids=[c[0] for c in INFER_ERRORS]
)
def test_infer_errors(
    client: TestClient, kwargs: dict[str, Any], status: int, kind: str, field: str | None, fragment: str
) -> None:
    r = client.post(URL, **kwargs)
    assert_problem(r, status, kind, field, fragment)
    assert r.json()["error"] == r.json()["detail"]  # what tritonclient shows
    if field:
        assert r.json()["detail"].startswith(f"{field}: ") or status == 413


@pytest.mark.parametrize(
    ("method", "path", "status", "kind", "fragment"),
    [
        ("GET", "/v2/models/resnet", 404, "unknown-model", "models: cnn, mlp"),
        ("GET", "/v2/models/cnn/versions/2", 404, "unknown-model", "no version '2'; versions: 1"),
        ("GET", "/v2/models/resnet/ready", 404, "unknown-model", "models: cnn, mlp"),
        ("GET", "/v2/models/cnn/versions/0/ready", 404, "unknown-model", "no version '0'"),
        ("POST", "/v2/models/resnet/infer", 404, "unknown-model", "models: cnn, mlp"),
        ("POST", "/v2/models/cnn/versions/7/infer", 404, "unknown-model", "no version '7'"),
        ("GET", "/v2/models/cnn/config", 404, "about:blank", "no route"),
        ("GET", "/v2/models/cnn/infer", 405, "about:blank", "GET is not allowed"),
    ],
)
def test_unknown_models_versions_and_routes(
    client: TestClient, method: str, path: str, status: int, kind: str, fragment: str
) -> None:
    r = client.request(method, path, json=request())
    assert_problem(r, status, kind, None, fragment)
    assert r.json()["error"] == r.json()["detail"]


def test_only_v2_problems_carry_the_error_member(client: TestClient) -> None:
    assert "error" not in client.get("/v1/models/resnet").json()
    assert "error" not in client.get("/v2x").json()


def test_the_problem_type_resolves(client: TestClient) -> None:
    kind = client.post(URL, json={"inputs": []}).json()["type"]
    doc = client.get(kind).json()
    assert doc["status"] == 400 and "Open Inference Protocol" in doc["description"]


def test_openapi_documents_the_json_body_and_the_binary_extension(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    op = doc["paths"]["/v2/models/{name}/infer"]["post"]
    assert op["operationId"] == "run_inference" and "Inference-Header-Content-Length" in op["description"]
    body = op["requestBody"]["content"]["application/json"]
    assert set(body["schema"]["properties"]) == {"id", "parameters", "inputs", "outputs"}
    assert {"application/json", "application/octet-stream"} == set(op["responses"]["200"]["content"])
    assert "error" in json.dumps(op["responses"]["400"])
    example = body["examples"]["uint8"]["value"]
    r = client.post(URL, json=example)
    assert r.status_code == 200 and r.json()["id"] == "a-1" and outputs(r.json()).argmax(1).tolist() == [1]


def test_metrics_and_the_access_log_name_v2_routes_in_full(client: TestClient) -> None:
    client.get("/v2/models/cnn/ready")
    client.post("/v2/models/cnn/infer", json={"inputs": []})
    text = client.get("/metrics").text
    assert 'route="/v2/models/{name}/ready",status="200"' in text
    assert 'route="/v2/models/{name}/infer",status="400"' in text
    assert 'route="/models/' not in text
