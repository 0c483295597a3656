"""/v1/predict, /predict and /v1/models through TestClient: every input form and every error."""

from __future__ import annotations

import base64
import io
import threading
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service import classifiers
from service.api import predict
from service.api.deps import PredictPayload
from service.config import Settings
from service.datasets import load_mnist
from service.devices import resolve_device
from service.main import create_app
from service.schemas import PredictOptions
from tests.api.test_errors import assert_problem
from tests.conftest import encoded, make_client, png_chunk

TEST = load_mnist("test")
LABELS = TEST.labels[:8].tolist()


def as_png(pixels: np.ndarray, invert: bool = False, size: int = 28) -> bytes:
    img = Image.fromarray(255 - pixels if invert else pixels).resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


LAB_TIFF = (lambda buf: (Image.new("LAB", (40, 40)).save(buf, format="TIFF"), buf.getvalue())[1])(io.BytesIO())
DRAWN = [as_png(TEST.images[i], invert=True, size=224) for i in range(8)]  # dark on white, 8x larger
B64 = [base64.b64encode(b).decode() for b in DRAWN]


def check_prediction(p: dict[str, Any], label: int, top_k: int = 3) -> None:
    assert p["label"] == label
    assert len(p["probabilities"]) == 10 and sum(p["probabilities"]) == pytest.approx(1, abs=1e-5)
    assert p["confidence"] == p["probabilities"][label] == max(p["probabilities"])
    assert [t["label"] for t in p["top_k"]][0] == label and len(p["top_k"]) == top_k
    assert [t["probability"] for t in p["top_k"]] == sorted((t["probability"] for t in p["top_k"]), reverse=True)


@pytest.mark.parametrize("path", ["/v1/predict", "/predict"])
@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_multipart_upload(client: TestClient, path: str, model: str) -> None:
    r = client.post(path, files={"image": ("d.png", DRAWN[0], "image/png")}, data={"model": model, "top_k": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model and body["device"] == str(resolve_device("auto"))  # the GPU on a GPU machine
    check_prediction(body, LABELS[0], top_k=4)
    assert body["preprocessing"]["mode"] == "mnist" and "inverted (light background)" in body["preprocessing"]["steps"]
    assert "input_image" not in body or body["input_image"] is None


def test_defaults_to_the_cnn(client: TestClient) -> None:
    r = client.post("/predict", files={"image": ("d.png", DRAWN[1])})
    assert r.status_code == 200 and r.json()["model"] == "cnn"
    check_prediction(r.json(), LABELS[1])


def test_json_base64_with_the_input_the_model_saw(client: TestClient) -> None:
    r = client.post("/v1/predict", json={"model": "cnn", "image": B64[2], "include_input": True, "top_k": 1})
    assert r.status_code == 200, r.text
    check_prediction(r.json(), LABELS[2], top_k=1)
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["input_image"]))))
    assert seen.shape == (28, 28) and seen.max() == 255 and seen[0].max() == 0  # white on black, margins


@pytest.mark.parametrize("scale", ["0..255", "0..1"])
def test_json_pixels(client: TestClient, scale: str) -> None:
    pixels = TEST.images[3].tolist() if scale == "0..255" else (TEST.images[3] / 255).tolist()
    r = client.post("/v1/predict", json={"model": "mlp", "pixels": pixels, "preprocess": "none"})
    assert r.status_code == 200, r.text
    check_prediction(r.json(), LABELS[3])
    assert r.json()["preprocessing"] == {"mode": "none", "steps": ["grayscale", "scaled to [0, 1]"]}


def test_batch_mixes_images_and_pixels_and_keeps_order(client: TestClient) -> None:
    images: list[Any] = [B64[4], TEST.images[5].tolist(), B64[6], TEST.images[7].tolist()]
    r = client.post("/v1/predict", json={"model": "cnn", "images": images, "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "cnn" and len(body["predictions"]) == 4
    for p, label in zip(body["predictions"], LABELS[4:8], strict=True):
        check_prediction(p, label, top_k=2)


def test_batch_answers_match_single_answers(client: TestClient) -> None:
    batch = client.post("/v1/predict", json={"images": B64[:3]}).json()["predictions"]
    for b64, p in zip(B64[:3], batch, strict=True):
        single = client.post("/v1/predict", json={"image": b64}).json()
        np.testing.assert_allclose(single["probabilities"], p["probabilities"], rtol=1e-5, atol=1e-7)


def test_models_list_and_card(client: TestClient) -> None:
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["cnn", "mlp"]
    card = client.get("/v1/models/cnn").json()
    assert card["test_accuracy"] >= 0.994 and len(card["weights"]["sha256"]) == 64
    assert [layer["type"] for layer in card["layers"]][:3] == ["Conv2d", "ReLU", "MaxPool2d"]
    assert card["layers"][0]["output_shape"] == [16, 28, 28]
    assert client.get("/v1/models/mlp").json()["layers"][-1]["output_shape"] == [10]


def test_cnn_featuremaps_layer_by_layer(client: TestClient) -> None:
    r = client.post("/v1/models/cnn/featuremaps", files={"image": ("d.png", DRAWN[0])})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(s["op"], s["shape"]) for s in body["stages"]] == [
        ("conv", [16, 28, 28]), ("relu", [16, 28, 28]), ("pool", [16, 14, 14]),
        ("conv", [32, 14, 14]), ("relu", [32, 14, 14]), ("pool", [32, 7, 7]),
        ("conv", [64, 7, 7]), ("relu", [64, 7, 7]), ("pool", [64, 3, 3]),
    ]  # fmt: skip
    assert body["input"] == {"height": 28, "width": 28, "channels": 1}
    kernels = body["filters"][0]["filters"]
    assert len(kernels) == 16 and np.asarray(kernels[0]["kernel"]).shape == (5, 5)
    assert body["model"] == "cnn" and body["prediction"]["label"] == LABELS[0]
    single = client.post("/v1/predict", json={"image": B64[0]}).json()
    assert body["prediction"]["probabilities"] == single["probabilities"]  # computed the same way: the same floats


def test_cnn_featuremaps_json_stages_and_montage(client: TestClient) -> None:
    spec = {"output": {"format": "json", "stages": [1]}, "preprocess": "none"}
    r = client.post(
        "/v1/models/cnn/featuremaps", json={"image": base64.b64encode(as_png(TEST.images[0])).decode(), **spec}
    )
    assert r.status_code == 200, r.text
    stage = r.json()["stages"][0]
    assert stage["index"] == 1 and np.asarray(stage["data"]).shape == (16, 28, 28) and stage["min"] >= 0
    r = client.post("/v1/models/cnn/featuremaps", files={"image": ("d.png", DRAWN[0])}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


# (id, request kwargs, status, problem type, field, fragment)
PREDICT_ERRORS: list[tuple[str, dict[str, Any], int, str, str | None, str]] = [
    (
        "a batch item a number",
        {"json": {"images": [1]}},
        422,
        "invalid-request",
        "images[0]",
        "must be a base64-encoded image, or 28 rows",
    ),
    ("unknown model, JSON", {"json": {"model": "resnet", "image": B64[0]}}, 422, "unknown-model", "model", "cnn, mlp"),
    (
        "unknown model, form",
        {"files": {"image": ("d.png", DRAWN[0])}, "data": {"model": "resnet"}},
        422,
        "unknown-model",
        "model",
        "cnn, mlp",
    ),
    (
        "bad model name",
        {"json": {"model": "../etc/passwd", "image": B64[0]}},
        422,
        "invalid-request",
        "model",
        "pattern",
    ),
    ("pixels 27 rows", {"json": {"pixels": [[0] * 28] * 27}}, 422, "invalid-digit", "pixels", "28 rows of 28"),
    (
        "pixels ragged",
        {"json": {"pixels": [[0] * 28] * 27 + [[0] * 3]}},
        422,
        "invalid-digit",
        "pixels",
        "28 rows of 28",
    ),
    ("pixels over 255", {"json": {"pixels": [[300] * 28] * 28}}, 422, "invalid-digit", "pixels", "0..255"),
    ("pixels not numbers", {"json": {"pixels": [["a"] * 28] * 28}}, 422, "invalid-request", "pixels[0][0]", "number"),
    ("empty batch", {"json": {"images": []}}, 422, "invalid-request", "images", "at least 1"),
    ("batch over the limit", {"json": {"images": [B64[0]] * 65}}, 413, "limit-exceeded", "images", "limit is 64"),
    ("bad item in a batch", {"json": {"images": [B64[0], "%%%"]}}, 422, "invalid-request", "images[1]", "base64"),
    (
        "blank item in a batch",
        {"json": {"images": [B64[0], [[0] * 28] * 28]}},
        422,
        "invalid-digit",
        "images[1]",
        "no digit",
    ),
    ("no input", {"json": {"model": "cnn"}}, 422, "invalid-request", "image", "exactly one"),
    (
        "two inputs",
        {"json": {"image": B64[0], "pixels": [[0] * 28] * 28}},
        422,
        "invalid-request",
        "pixels",
        "exactly one",
    ),
    ("top_k 0", {"json": {"image": B64[0], "top_k": 0}}, 422, "invalid-request", "top_k", "greater than or equal to 1"),
    (
        "top_k 11, form",
        {"files": {"image": ("d.png", DRAWN[0])}, "data": {"top_k": "11"}},
        422,
        "invalid-request",
        "top_k",
        "less than or equal to 10",
    ),
    (
        "top_k word, form",
        {"files": {"image": ("d.png", DRAWN[0])}, "data": {"top_k": "three"}},
        422,
        "invalid-request",
        "top_k",
        "integer",
    ),
    (
        "unknown preprocess",
        {"json": {"image": B64[0], "preprocess": "magic"}},
        422,
        "invalid-request",
        "preprocess",
        "'mnist' or 'none'",
    ),
    ("none needs 28x28", {"json": {"image": B64[0], "preprocess": "none"}}, 422, "invalid-digit", "image", "28x28"),
    (
        "blank image",
        {"files": {"image": ("d.png", as_png(np.zeros((28, 28), np.uint8)))}},
        422,
        "invalid-digit",
        "image",
        "no digit",
    ),
    ("not an image", {"files": {"image": ("d.txt", b"seven")}}, 415, "unsupported-media-type", "image", "PNG"),
    ("LAB image", {"files": {"image": ("d.tif", LAB_TIFF)}}, 415, "unsupported-media-type", "image", "LAB"),
    (
        "unknown form field",
        {"files": {"image": ("d.png", DRAWN[0])}, "data": {"modle": "cnn"}},
        422,
        "invalid-request",
        "modle",
        "unknown form field",
    ),
    (
        "missing device",
        {"json": {"image": B64[0], "device": "cuda:3"}},
        422,
        "device-unavailable",
        "device",
        "available",
    ),
    (
        "text body",
        {"content": b"7", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported-media-type",
        None,
        "multipart",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "status", "kind", "field", "fragment"),
    [c[1:] for c in PREDICT_ERRORS],
    ids=[c[0] for c in PREDICT_ERRORS],
)
def test_predict_errors(
    client: TestClient, kwargs: dict[str, Any], status: int, kind: str, field: str | None, fragment: str
) -> None:
    assert_problem(client.post("/v1/predict", **kwargs), status, kind, field, fragment)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "kind", "fragment"),
    [
        ("GET", "/v1/models/resnet", {}, 404, "unknown-model", "cnn, mlp"),
        ("GET", "/v1/models/..%2F..%2Fetc", {}, 404, "about:blank", "no route"),
        ("GET", "/v1/models/UPPER", {}, 404, "unknown-model", "unknown model 'UPPER'; models: cnn, mlp"),
        ("GET", "/v1/models/cnn%20", {}, 404, "unknown-model", "unknown model 'cnn '"),
        ("GET", "/v1/models/" + "x" * 5000, {}, 404, "unknown-model", "unknown model '" + "x" * 40 + "...'; models"),
        (
            "POST",
            "/v1/models/CNN/featuremaps",
            {"files": {"image": ("d.png", DRAWN[0])}},
            404,
            "unknown-model",
            "'CNN'",
        ),
        (
            "POST",
            "/v1/models/mlp/featuremaps",
            {"files": {"image": ("d.png", DRAWN[0])}},
            404,
            "no-feature-maps",
            "no convolutional layers",
        ),
        (
            "POST",
            "/v1/models/resnet/featuremaps",
            {"files": {"image": ("d.png", DRAWN[0])}},
            404,
            "unknown-model",
            "cnn, mlp",
        ),
        (
            "POST",
            "/v1/models/cnn/featuremaps",
            {"json": {"image": B64[0], "output": {"stages": [9]}}},
            422,
            "invalid-spec",
            "stages 0..8",
        ),
        (
            "POST",
            "/v1/models/cnn/featuremaps",
            {"json": {"image": B64[0], "output": {"stages": [1, 1]}}},
            422,
            "invalid-spec",
            "asked for twice",
        ),
        (
            "POST",
            "/v1/models/cnn/featuremaps",
            {"json": {"image": B64[0], "layers": []}},
            422,
            "invalid-request",
            "Extra inputs",
        ),
    ],
)
def test_models_errors(
    client: TestClient, method: str, path: str, kwargs: dict[str, Any], status: int, kind: str, fragment: str
) -> None:
    assert_problem(client.request(method, path, **kwargs), status, kind, None, fragment)


def test_batch_limit_is_configurable() -> None:
    with make_client(max_batch=2) as small:
        r = small.post("/v1/predict", json={"images": B64[:3]})
        assert_problem(r, 413, "limit-exceeded", "images", "limit is 2")
        assert small.post("/v1/predict", json={"images": B64[:2]}).status_code == 200


def test_not_ready_until_the_models_are_loaded(held_warm_up: threading.Event) -> None:
    gate = held_warm_up
    with TestClient(create_app(Settings(warmup=True))) as c:
        assert c.get("/readyz").status_code == 503
        r = c.post("/v1/predict", json={"image": B64[0]})
        assert_problem(r, 503, "models-loading", None, "loading")
        assert r.headers["retry-after"] == "1"
        gate.set()
        assert c.app_state["readiness"].wait(30)
        assert c.post("/v1/predict", json={"image": B64[0]}).status_code == 200


def test_missing_weights_keep_the_service_not_ready(tmp_path: Any) -> None:
    with TestClient(create_app(Settings(warmup=True, models_dir=tmp_path))) as c:
        for _ in range(300):
            if c.get("/readyz").json()["status"] != "starting":
                break
            threading.Event().wait(0.01)
        assert c.get("/readyz").status_code == 503 and c.get("/readyz").json() == {"status": "unavailable"}
        assert c.get("/healthz").status_code == 200


def test_form_fields_are_documented_in_openapi(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    form = doc["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "model", "top_k", "preprocess", "device", "include_input"} <= set(form["properties"])
    alias, versioned = doc["paths"]["/predict"]["post"], doc["paths"]["/v1/predict"]["post"]
    assert (
        alias["requestBody"] == versioned["requestBody"] and alias["responses"].keys() == versioned["responses"].keys()
    )
    assert alias["operationId"] == "predict_digit_unversioned" and versioned["operationId"] == "predict_digit"


def test_concurrent_predictions_keep_their_own_answers_and_a_bad_one_fails_alone(client: TestClient) -> None:
    requests: list[dict[str, Any]] = [{"json": {"image": b64}} for b64 in B64] * 3
    requests.insert(5, {"json": {"pixels": [[0] * 28] * 28}})  # blank: no digit
    outcomes: list[Any] = [None] * len(requests)

    def send(i: int) -> None:
        outcomes[i] = client.post("/v1/predict", **requests[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, r in enumerate(outcomes):
        if i == 5:
            assert_problem(r, 422, "invalid-digit", "pixels", "no digit")
        else:
            assert r.status_code == 200, r.text
            check_prediction(r.json(), LABELS[B64.index(requests[i]["json"]["image"])])


def test_predictions_for_the_same_device_share_a_batch_however_it_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Devices "auto" and "cpu" (on a CPU-only machine) are one: predictions that wait together share a batch. A
    device that is not here is refused before it takes a place in the queue."""
    gate, held = threading.Event(), threading.Event()
    prepare = classifiers.prepare_digit

    def first_held(*args: Any) -> Any:
        if not held.is_set():
            held.set()
            gate.wait(30)
        return prepare(*args)

    monkeypatch.setattr(classifiers, "prepare_digit", first_held)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # what "auto" resolves to
    with make_client(compute_slots=1) as c:
        batcher = c.app_state["batcher"]
        r = c.post("/v1/predict", json={"image": B64[0], "device": "cuda:9"})
        assert_problem(r, 422, "device-unavailable", "device", "not available")
        assert not batcher.batch_sizes  # refused, not queued
        c.app_state["metrics"].requests_in_flight += 1  # as if another request were in flight: none runs inline
        outcomes: list[Any] = [None] * 3

        def send(i: int, device: str) -> None:
            outcomes[i] = c.post("/v1/predict", json={"image": B64[i], "device": device})

        threads = [threading.Thread(target=send, args=(0, device))]
        threads[0].start()
        assert held.wait(30)  # the first batch is computing, held
        threads += [threading.Thread(target=send, args=(i, name)) for i, name in ((1, "auto"), (2, device))]
        for t in threads[1:]:
            t.start()
        for _ in range(3000):  # until both wait for the next batch (10 ms polls, 30 s at most)
            if sum(len(queue) for queue in batcher._pending.values()) == 2:
                break
            threading.Event().wait(0.01)
        gate.set()
        for t in threads:
            t.join(60)
        assert list(batcher.batch_sizes) == [1, 2]
        for i, r in enumerate(outcomes):
            assert r.status_code == 200, r.text
            check_prediction(r.json(), LABELS[i])


def test_batching_can_be_turned_off() -> None:
    with make_client(batch_max_size=1) as c:
        r = c.post("/v1/predict", json={"image": B64[0]})
        assert r.status_code == 200 and r.json()["label"] == LABELS[0]
        assert not c.app_state["batcher"].batch_sizes


def _png(size: tuple[int, int], mode: str = "L") -> bytes:
    return encoded(Image.fromarray(np.resize(TEST.images[0], size[::-1]), "L").convert(mode), "PNG")


def _ihdr_first(png: bytes, width: int, height: int) -> bytes:
    """`png` with an IHDR for `width` x `height` (8-bit gray) before its own, which Pillow then obeys."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return png[:8] + png_chunk(b"IHDR", ihdr) + png[8:]


NOISE_64 = encoded(
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA"), "PNG"
)


@pytest.mark.parametrize(
    ("request_kwargs", "on_loop"),
    [
        ({"files": {"image": ("d.png", as_png(TEST.images[0]))}}, True),  # a 28x28 PNG digit
        ({"files": {"image": ("d.png", _png((64, 64), "RGBA"))}}, True),
        ({"json": {"pixels": TEST.images[0].tolist()}}, True),
        ({"json": {"pixels": [[0] * 28] * 27 + [[0] * 29]}}, False),  # not 28x28: refused, on a compute thread
        ({"files": {"image": ("d.png", _png((65, 64)))}}, False),  # over 64x64 pixels
        ({"files": {"image": ("d.png", _ihdr_first(_png((65, 64)), 28, 28))}}, False),  # then its own 65x64 IHDR
        ({"files": {"image": ("d.png", DRAWN[0])}}, False),  # 224x224
        ({"files": {"image": ("d.png", NOISE_64)}}, False),  # 64x64, but over 16 KiB
        ({"files": {"image": ("d.jpg", encoded(Image.fromarray(TEST.images[0]), "JPEG"))}}, False),
        ({"files": {"image": ("d.png", as_png(TEST.images[0]))}, "data": {"device": "cuda"}}, None),  # no CUDA: 4xx
    ],
    ids=[
        "28x28 png",
        "64x64 rgba png",
        "pixels",
        "pixels 28+1",
        "65x64 png",
        "a 28x28 IHDR, then 65x64",
        "224x224 png",
        "64x64 png over 16 KiB",
        "jpeg",
        "cuda",
    ],
)
def test_a_lone_light_prediction_runs_on_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, request_kwargs: dict[str, Any], on_loop: bool | None
) -> None:
    """While it is the worker's only request, a small PNG or pixel values are predicted on the loop's own thread
    (no hand-over to a compute thread and back); larger inputs, other formats, and a second request in flight
    (simulated by the count) go to a compute thread. Both ways give the same answer."""
    if on_loop is None and torch.cuda.is_available():
        pytest.skip("tests the CPU-only machine's answer to a CUDA request")
    assert len(NOISE_64) > predict.INLINE_MAX_BYTES
    threads: list[str] = []
    prepare = classifiers.prepare_digit

    def recorded(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return prepare(*args)

    monkeypatch.setattr(classifiers, "prepare_digit", recorded)
    metrics = client.app_state["metrics"]
    lone = client.post("/v1/predict", **request_kwargs)
    metrics.requests_in_flight += 1  # as if another request were being read or answered
    try:
        accompanied = client.post("/v1/predict", **request_kwargs)
    finally:
        metrics.requests_in_flight -= 1
    assert lone.status_code == accompanied.status_code and lone.json() == accompanied.json()
    if on_loop is None:
        assert_problem(lone, 422, "device-unavailable", None, "device 'cuda' is not available")
        return
    if "pixels" in request_kwargs.get("json", {}) and not on_loop:
        assert_problem(lone, 422, "invalid-digit", "pixels", "28 rows of 28")
    else:
        assert lone.status_code == 200, lone.text
    assert [name.startswith("compute") for name in threads] == [not on_loop, True]


def test_a_gpu_prediction_never_runs_on_the_event_loop(client: TestClient) -> None:
    """On a GPU machine, where "auto" means CUDA, a small digit still goes to a compute thread."""
    digit = as_png(TEST.images[0])
    payload = PredictPayload(PredictOptions(), [(("image",), digit)], batch=False)
    job = (payload, client.app_state["registry"].get("cnn"), client.app_state["settings"])
    assert predict.is_light((*job, torch.device("cpu")))
    assert not predict.is_light((*job, torch.device("cuda")))
