"""POST /v1/featuremaps through TestClient: each input encoding, each output format, and the montage."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service import imaging, pipeline
from service.devices import resolve_device
from service.pipeline import Limits, PipelineSpec
from service.schemas import FeaturemapsResponse
from tests.conftest import DOG

URL = "/v1/featuremaps"


def reference_stages() -> list[torch.Tensor]:
    x = imaging.image_to_tensor(imaging.decode_image(DOG.read_bytes(), 10**8), "gray", "unit")
    return [s.maps for s in pipeline.run_pipeline(x, PipelineSpec(), Limits()).stages]


def png_pixels(b64: str) -> np.ndarray:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return np.asarray(img)


def test_multipart_defaults_reproduce_the_tutorial_as_pngs(client: TestClient, dog_bytes: bytes) -> None:
    r = client.post(URL, files={"image": ("dog.jpg", dog_bytes, "image/jpeg")})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    FeaturemapsResponse.model_validate(body)
    assert body["device"] == str(resolve_device("auto"))  # the CPU here; the GPU on a GPU machine
    assert body["input"] == {"height": 300, "width": 300, "channels": 1}
    assert [f["name"] for f in body["filters"][0]["filters"]] == ["seed_1", "seed_2", "seed_3", "seed_4"]
    assert body["filters"][0]["filters"][0]["kernel"] == [[-1, -1, 1, 1]] * 4
    assert [(s["index"], s["op"], s["shape"]) for s in body["stages"]] == [
        (0, "conv", [4, 297, 297]),
        (1, "relu", [4, 297, 297]),
        (2, "pool", [4, 148, 148]),
    ]
    for stage, ref in zip(body["stages"], reference_stages(), strict=True):
        assert stage["min"] == pytest.approx(float(ref.min())) and stage["max"] == pytest.approx(float(ref.max()))
        assert len(stage["maps"]) == 4 and "data" not in stage
        for c, b64 in enumerate(stage["maps"]):
            want = imaging.to_levels(ref[c : c + 1], "per_map", 1.0).levels[0]
            np.testing.assert_array_equal(png_pixels(b64), want)
            lo, hi = stage["map_ranges"][c]
            assert lo == pytest.approx(float(ref[c].min())) and hi == pytest.approx(float(ref[c].max()))


def test_json_base64_input_and_exact_float32_output(client: TestClient, dog_bytes: bytes) -> None:
    body = {"image": base64.b64encode(dog_bytes).decode(), "output": {"format": "json"}}
    r = client.post(URL, json=body)
    assert r.status_code == 200, r.text
    for stage, ref in zip(r.json()["stages"], reference_stages(), strict=True):
        data = np.asarray(stage["data"], dtype=np.float32)
        assert data.shape == tuple(stage["shape"])
        np.testing.assert_array_equal(data, ref.numpy())  # exact: every float32 round-trips
        assert "maps" not in stage


@pytest.mark.parametrize(
    "encode",
    [
        lambda b: "data:image/jpeg;base64," + base64.b64encode(b).decode(),
        lambda b: base64.urlsafe_b64encode(b).decode().rstrip("="),
        lambda b: "\n".join(base64.b64encode(b).decode()[i : i + 76] for i in range(0, 10**6, 76)),
    ],
    ids=["data-url", "urlsafe-unpadded", "mime-wrapped"],
)
def test_json_accepts_common_base64_spellings(client: TestClient, dog_bytes: bytes, encode: object) -> None:
    r = client.post(URL, json={"image": encode(dog_bytes), "output": {"stages": [0]}})  # type: ignore[operator]
    assert r.status_code == 200, r.text


SOBEL_RGB = json.dumps({"color": "rgb", "layers": [{"op": "conv", "filters": ["sobel_x"], "padding": "same"}]})


@pytest.mark.parametrize("as_file", [False, True], ids=["form-field", "file-part"])
def test_multipart_spec_as_text_field_or_file_part(client: TestClient, dog_bytes: bytes, as_file: bool) -> None:
    files = {"image": ("dog.jpg", dog_bytes, "image/jpeg")}
    if as_file:  # curl -F spec=@spec.json
        r = client.post(URL, files={**files, "spec": ("spec.json", SOBEL_RGB.encode(), "application/json")})
    else:
        r = client.post(URL, files=files, data={"spec": SOBEL_RGB})
    assert r.status_code == 200, r.text
    stage = r.json()["stages"][0]
    assert stage["shape"] == [3, 300, 300]
    assert stage["channels"] == ["sobel_x(R)", "sobel_x(G)", "sobel_x(B)"]


def test_stage_selection_scale_and_colormap(client: TestClient, dog_bytes: bytes) -> None:
    spec = {"output": {"stages": [2, 0], "scale": "per_stage", "colormap": "viridis"}}
    r = client.post(URL, files={"image": ("dog.jpg", dog_bytes)}, data={"spec": json.dumps(spec)})
    assert r.status_code == 200, r.text
    stages = r.json()["stages"]
    assert [s["index"] for s in stages] == [2, 0]
    for s in stages:
        assert all(rng == [s["min"], s["max"]] for rng in s["map_ranges"])
        assert png_pixels(s["maps"][0]).shape == (*s["shape"][1:], 3)


def test_normalize_none_keeps_0_to_255(client: TestClient, dog_bytes: bytes) -> None:
    spec = {"normalize": "none", "layers": [{"op": "conv", "filters": ["identity"]}], "output": {"format": "json"}}
    r = client.post(URL, files={"image": ("dog.jpg", dog_bytes)}, data={"spec": json.dumps(spec)})
    assert r.status_code == 200
    assert r.json()["stages"][0]["max"] > 200


def test_inline_kernels_and_custom_names(client: TestClient, dog_bytes: bytes) -> None:
    spec = {
        "layers": [
            {"op": "conv", "filters": [{"name": "edge", "kernel": [[1, -1]]}, {"kernel": [[-1, 1]]}], "bias": 0.5},
            {"op": "leaky_relu", "negative_slope": 0.1},
            {"op": "pool", "mode": "avg", "size": 3, "stride": 2},
        ],
        "output": {"format": "json"},
    }
    r = client.post(URL, files={"image": ("dog.jpg", dog_bytes)}, data={"spec": json.dumps(spec)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [f["name"] for f in body["filters"][0]["filters"]] == ["edge", "custom_2"]
    assert [s["shape"] for s in body["stages"]] == [[2, 300, 299], [2, 300, 299], [2, 149, 149]]


@pytest.mark.parametrize(
    "accept", ["image/png", "image/png, application/json;q=0.5", "application/json;q=0.1, image/png"]
)
def test_accept_png_returns_one_labelled_montage(client: TestClient, dog_bytes: bytes, accept: str) -> None:
    r = client.post(URL, files={"image": ("dog.jpg", dog_bytes)}, headers={"Accept": accept})
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(r.content))
    assert picture.width >= 4 * 297 and picture.height >= 3 * 148  # 3 stage rows of 4 maps


@pytest.mark.parametrize("accept", ["application/json", "*/*", "image/png;q=0.2, application/json", "text/html"])
def test_other_accept_headers_get_json(client: TestClient, dog_bytes: bytes, accept: str) -> None:
    r = client.post(URL, files={"image": ("dog.jpg", dog_bytes)}, headers={"Accept": accept})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"])
def test_every_accepted_format(client: TestClient, fmt: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), "orange").save(buf, format=fmt)
    r = client.post(URL, files={"image": (f"x.{fmt.lower()}", buf.getvalue())})
    assert r.status_code == 200, r.text
    assert r.json()["input"] == {"height": 16, "width": 20, "channels": 1}


def test_explicit_cpu_device(client: TestClient, dog_bytes: bytes) -> None:
    r = client.post(URL, files={"image": ("dog.jpg", dog_bytes)}, data={"spec": json.dumps({"device": "cpu"})})
    assert r.status_code == 200
    assert r.json()["device"] == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_device_gives_the_same_maps(client: TestClient, dog_bytes: bytes) -> None:
    def run(device: str) -> dict[str, object]:
        spec = {"device": device, "output": {"format": "json"}}
        r = client.post(URL, files={"image": ("dog.jpg", dog_bytes)}, data={"spec": json.dumps(spec)})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    cpu, cuda = run("cpu"), run("cuda")
    assert str(cuda["device"]).startswith("cuda")
    for a, b in zip(cpu["stages"], cuda["stages"], strict=True):  # type: ignore[call-overload]
        np.testing.assert_allclose(np.asarray(a["data"]), np.asarray(b["data"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("dtype", "np_dtype"), [("float32", "<f4"), ("float16", "<f2")])
def test_base64_tensors_are_the_same_values_in_far_fewer_bytes(
    client: TestClient, dog_bytes: bytes, dtype: str, np_dtype: str
) -> None:
    lists = client.post(
        URL, files={"image": ("dog.jpg", dog_bytes)}, data={"spec": json.dumps({"output": {"format": "json"}})}
    )
    spec = {"output": {"format": "json", "tensor_encoding": "base64", "dtype": dtype}}
    packed = client.post(URL, files={"image": ("dog.jpg", dog_bytes)}, data={"spec": json.dumps(spec)})
    assert packed.status_code == 200, packed.text
    # the dog's maps are half zeros (ReLU), which lists spell in 3 characters; dense maps gain more
    assert len(packed.content) < (0.6 if dtype == "float32" else 0.3) * len(lists.content)
    for a, b in zip(lists.json()["stages"], packed.json()["stages"], strict=True):
        assert b["dtype"] == dtype and "data" not in b
        values = np.frombuffer(base64.b64decode(b["data_base64"]), dtype=np_dtype).reshape(b["shape"])
        want = np.asarray(a["data"], dtype=np.float32)
        if dtype == "float32":
            np.testing.assert_array_equal(values, want)
        else:
            np.testing.assert_array_equal(values, want.astype(np.float16))
