"""Every client error is RFC 9457 problem+json with the right 4xx and a pointer to the field at fault."""

from __future__ import annotations

import base64
import gzip
import io
import json
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.errors import REFUSAL_REASONS
from service.middleware import BodyLimitMiddleware
from tests.conftest import DOG, make_client

URL = "/v1/featuremaps"
DOG_B64 = base64.b64encode(DOG.read_bytes()).decode()


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, format="PNG")
    return buf.getvalue()


def spec_with(**fields: Any) -> dict[str, Any]:
    return {"image": DOG_B64, **fields}


def with_image(raw_json: str) -> str:
    """A raw JSON spec (it may hold NaN or Infinity, which json.dumps would not write) plus the dog."""
    return raw_json[:-1] + f', "image": "{DOG_B64}"}}'


def conv(**fields: Any) -> dict[str, Any]:
    return {"op": "conv", "filters": "seed4", **fields}


# (id, json body, status, problem type, field of the first error or None, fragment of the detail)
# fmt: off
JSON_CASES: list[tuple[str, Any, int, str, str | None, str]] = [
    ("unknown preset", spec_with(layers=[conv(filters=["sobel_x", "nope"])]), 422, "invalid-spec", "layers[0].filters[1]", "sobel_y"),
    ("unknown bank", spec_with(layers=[conv(filters="nope")]), 422, "invalid-spec", "layers[0].filters", "seed4"),
    ("ragged kernel", spec_with(layers=[conv(filters=["sobel_x", {"kernel": [[1, 2], [3]]}])]), 422, "invalid-spec", "layers[0].filters[1].kernel", "ragged"),
    ("empty kernel", spec_with(layers=[conv(filters=[{"kernel": []}])]), 422, "invalid-spec", "layers[0].filters[0].kernel", "empty"),
    ("non-numeric kernel", spec_with(layers=[conv(filters=[{"kernel": [[1, "x"]]}])]), 422, "invalid-spec", "layers[0].filters[0].kernel", "non-numeric"),
    ("1-D kernel", spec_with(layers=[conv(filters=[{"kernel": [1, 2, 3]}])]), 422, "invalid-spec", "layers[0].filters[0].kernel", "2-D"),
    ("empty filter list", spec_with(layers=[conv(filters=[])]), 422, "invalid-spec", "layers[0].filters", "at least one"),
    ("zero stride", spec_with(layers=[conv(stride=0)]), 422, "invalid-request", "layers[0].stride", "greater than or equal to 1"),
    ("negative stride", spec_with(layers=[conv(stride=-2)]), 422, "invalid-request", "layers[0].stride", "greater than or equal to 1"),
    ("string stride", spec_with(layers=[conv(stride="2")]), 422, "invalid-request", "layers[0].stride", "integer"),
    ("zero pool size", spec_with(layers=[{"op": "pool", "size": 0}]), 422, "invalid-request", "layers[0].size", "greater than or equal to 1"),
    ("zero pool stride", spec_with(layers=[{"op": "pool", "stride": 0}]), 422, "invalid-request", "layers[0].stride", "greater than or equal to 1"),
    ("pool larger than input", spec_with(layers=[{"op": "pool", "size": 301}]), 422, "invalid-spec", "layers[0].size", "larger than its 300x300 input"),
    ("kernel larger than input", spec_with(layers=[{"op": "pool", "size": 150}, {"op": "pool", "size": 2}, conv(filters=[{"kernel": [[1] * 5] * 5}])]), 422, "invalid-spec", "layers[2].filters[0].kernel", "larger than"),
    ("bad padding word", spec_with(layers=[conv(padding="full")]), 422, "invalid-request", "layers[0].padding", "'valid' or 'same'"),
    ("negative padding", spec_with(layers=[conv(padding=-1)]), 422, "invalid-request", "layers[0].padding", "greater than or equal to 0"),
    ("bad padding mode", spec_with(layers=[conv(padding_mode="mirror")]), 422, "invalid-request", "layers[0].padding_mode", "zeros"),
    ("bias count", spec_with(layers=[conv(bias=[1, 2])]), 422, "invalid-spec", "layers[0].bias", "2 values for 4 filters"),
    ("unknown op", spec_with(layers=[{"op": "softmax"}]), 422, "invalid-request", "layers[0]", "op must be one of"),
    ("missing op", spec_with(layers=[{"filters": "seed4"}]), 422, "invalid-request", "layers[0]", "op must be one of"),
    ("typo field", spec_with(layers=[conv(filter="seed4")]), 422, "invalid-request", "layers[0].filter", "Extra inputs"),
    ("empty layers", spec_with(layers=[]), 422, "invalid-request", "layers", "at least 1"),
    ("layers not a list", spec_with(layers="conv"), 422, "invalid-request", "layers", "array"),
    ("unknown color", spec_with(color="cmyk"), 422, "invalid-request", "color", "'gray' or 'rgb'"),
    ("unknown normalize", spec_with(normalize="z"), 422, "invalid-request", "normalize", "'unit' or 'none'"),
    ("unknown format", spec_with(output={"format": "npy"}), 422, "invalid-request", "output.format", "'png' or 'json'"),
    ("unknown colormap", spec_with(output={"colormap": "jet"}), 422, "invalid-request", "output.colormap", "viridis"),
    ("unknown scale", spec_with(output={"scale": "log"}), 422, "invalid-request", "output.scale", "per_map"),
    ("stage out of range", spec_with(output={"stages": [0, 7]}), 422, "invalid-spec", "output.stages[1]", "stages 0..2"),
    ("stage asked twice", spec_with(output={"stages": [2, 0, 2]}), 422, "invalid-spec", "output.stages[2]", "asked for twice"),
    ("too many stage indices", spec_with(output={"stages": [0] * 257}), 422, "invalid-request", "output.stages", "at most 256"),
    ("kernel value beyond any float", spec_with(layers=[conv(filters=[{"kernel": [[10**400]]}])]), 422, "invalid-spec", "layers[0].filters[0].kernel", "too large"),
    ("negative stage", spec_with(output={"stages": [-1]}), 422, "invalid-request", "output.stages[0]", "greater than or equal to 0"),
    ("device missing", spec_with(device="cuda:7"), 422, "device-unavailable", "device", "available: cpu"),
    ("device nonsense", spec_with(device="tpu"), 422, "invalid-request", "device", "pattern"),
    ("image not base64", spec_with(image="%%%not base64%%%"), 422, "invalid-request", "image", "base64"),
    ("image missing", {"color": "gray"}, 422, "invalid-request", "image", "required"),
    ("image is text", spec_with(image=base64.b64encode(b"just some text").decode()), 415, "unsupported-media-type", None, "PNG, JPEG"),
    ("image truncated", spec_with(image=DOG_B64[:2000]), 422, "invalid-image", None, "corrupt or truncated"),
    ("too many layers", spec_with(layers=[{"op": "relu"}] * 17), 413, "limit-exceeded", "layers", "limit is 16"),
    ("too many filters", spec_with(layers=[conv(filters=["identity"] * 65)]), 413, "limit-exceeded", "layers[0].filters", "limit is 64"),
    ("kernel too big", spec_with(layers=[conv(filters=[{"kernel": [[0] * 33] * 33}])]), 413, "limit-exceeded", "layers[0].filters[0]", "largest kernel side allowed is 31"),
    ("output too large", spec_with(layers=[conv(filters=["identity"] * 64, padding="same"), conv(filters=["identity"] * 64, padding="same")]), 413, "limit-exceeded", "layers[1]", "stage 1 (conv"),
    # 2-D kernels on every channel: 3 -> 192 -> 12,288 channels of 1x1, then a 201x201 padded copy of each (2 GB)
    ("padding too large", spec_with(color="rgb", layers=[conv(filters=[{"kernel": [[1]]}] * 64, stride=1024)] * 2 + [conv(filters=[{"kernel": [[1]]}], padding=100, stride=1024)]), 413, "limit-exceeded", "layers[2].padding", "input 12288x201x201, 496,435,200 elements more; the limit is 50,000,000"),
    ("an inline filter's name not text", spec_with(layers=[conv(filters=[{"name": 5, "kernel": [[1]]}])]), 422, "invalid-request", "layers[0].filters[0].name", "valid string"),
    ("filters a number", spec_with(layers=[conv(filters=5)]), 422, "invalid-request", "layers[0].filters", "must be a bank or preset name, or a list"),
    ("a filter a number", spec_with(layers=[conv(filters=[5])]), 422, "invalid-request", "layers[0].filters[0]", "must be a preset name or a {name, kernel} object"),
    ("padding null", spec_with(layers=[conv(padding=None)]), 422, "invalid-request", "layers[0].padding", "must be 'valid', 'same' or a number of pixels"),
    ("bias text", spec_with(layers=[conv(bias="1")]), 422, "invalid-request", "layers[0].bias", "must be a number, or a list"),
    ("stages a number", spec_with(output={"stages": 5}), 422, "invalid-request", "output.stages", "must be 'all' or a list of stage indices"),
    ("NaN kernel", with_image('{"layers": [{"op": "conv", "filters": [{"kernel": [[NaN, 1]]}]}]}'), 422, "invalid-spec", "layers[0].filters[0].kernel", "non-finite"),
    ("infinite kernel", with_image('{"layers": [{"op": "conv", "filters": [{"kernel": [[1, -Infinity]]}]}]}'), 422, "invalid-spec", "layers[0].filters[0].kernel", "non-finite"),
    ("infinite bias", with_image('{"layers": [{"op": "conv", "filters": "seed4", "bias": Infinity}]}'), 422, "invalid-request", "layers[0].bias", "finite"),
    ("overflowing kernel", spec_with(layers=[conv(filters=[{"kernel": [[3e38] * 3] * 3}])]), 422, "invalid-spec", "layers[0]", "overflow"),
    ("body not JSON", "{not json", 422, "invalid-request", None, "JSON"),
    ("body is a list", [1, 2], 422, "invalid-request", None, "object"),
]
# fmt: on


@pytest.mark.parametrize(
    ("body", "status", "kind", "field", "fragment"), [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES]
)
def test_json_request_errors(
    client: TestClient, body: Any, status: int, kind: str, field: str | None, fragment: str
) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    r = client.post(URL, content=content, headers={"Content-Type": "application/json"})
    assert_problem(r, status, kind, field, fragment)


def assert_problem(r: Any, status: int, kind: str, field: str | None, fragment: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"] == (f"/problems/{kind}" if kind != "about:blank" else kind)
    assert body["status"] == status and body["title"] and body["instance"]
    assert fragment in body["detail"] or any(fragment in e["detail"] for e in body.get("errors", [])), body
    if field is not None:
        assert body["errors"][0]["field"] == field, body["errors"]
        assert body["errors"][0]["pointer"].startswith("#/")


# fmt: off
MULTIPART_CASES: list[tuple[str, dict[str, Any], dict[str, str] | None, int, str, str | None, str]] = [
    ("no image field", {"file": ("dog.jpg", DOG.read_bytes())}, None, 422, "invalid-request", "file", "unknown form field"),
    ("image as text field", {}, {"image": "hello"}, 422, "invalid-request", "image", "file field named 'image'"),
    ("spec not JSON", {"image": ("dog.jpg", DOG.read_bytes())}, {"spec": "{oops"}, 422, "invalid-request", None, "JSON"),
    ("spec invalid", {"image": ("dog.jpg", DOG.read_bytes())}, {"spec": '{"layers": [{"op": "pool", "size": 0}]}'}, 422, "invalid-request", "layers[0].size", "greater"),
    ("empty image", {"image": ("x.png", b"")}, None, 422, "invalid-image", None, "empty"),
    ("pdf image", {"image": ("x.pdf", b"%PDF-1.7 ...")}, None, 415, "unsupported-media-type", None, "WebP"),
    ("1x1 image, default pipeline", {"image": ("x.png", png(1, 1))}, None, 422, "invalid-spec", "layers[0].filters[0].kernel", "larger than"),
]
# fmt: on


@pytest.mark.parametrize(
    ("files", "data", "status", "kind", "field", "fragment"),
    [c[1:] for c in MULTIPART_CASES],
    ids=[c[0] for c in MULTIPART_CASES],
)
def test_multipart_request_errors(
    client: TestClient,
    files: dict[str, Any],
    data: dict[str, str] | None,
    status: int,
    kind: str,
    field: str | None,
    fragment: str,
) -> None:
    if not files:  # force multipart even with text fields only
        r = client.post(URL, files={"spec": (None, "{}")}, data=data)
    else:
        r = client.post(URL, files=files, data=data)
    assert_problem(r, status, kind, field, fragment)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [("text/plain", b"hello"), ("image/png", png(4, 4)), ("", b"x"), ("application/x-www-form-urlencoded", b"a=1")],
)
def test_other_content_types_are_415(client: TestClient, content_type: str, body: bytes) -> None:
    r = client.post(URL, content=body, headers={"Content-Type": content_type} if content_type else {})
    assert_problem(r, 415, "unsupported-media-type", None, "multipart/form-data")


def _part(name: str, data: bytes, filename: str | None = None) -> bytes:
    file = f'; filename="{filename}"' if filename else ""
    return f'--xyz\r\nContent-Disposition: form-data; name="{name}"{file}\r\n\r\n'.encode() + data + b"\r\n"


MULTIPART = "multipart/form-data; boundary=xyz"
# fmt: off
BROKEN_MULTIPART: list[tuple[str, str, bytes, str]] = [
    ("broken body", MULTIPART, b"--xyz\r\nnot a part", "Invalid multipart data."),
    ("no boundary", "multipart/form-data", b"--xyz\r\n", "Missing boundary in multipart."),
    ("a part without a name", MULTIPART, b"--xyz\r\nContent-Disposition: form-data\r\n\r\n1\r\n--xyz--\r\n", '"name" must be provided'),
    ("too many files", MULTIPART, b"".join(_part(f"f{i}", b"1", "f.png") for i in range(3)) + b"--xyz--\r\n", "Too many files. Maximum number of files is 2."),
    ("a field over 1 MiB", MULTIPART, _part("spec", b" " * (1024 * 1024 + 1)) + b"--xyz--\r\n", "Part exceeded maximum size of 1024KB."),
]
# fmt: on


@pytest.mark.parametrize(
    ("content_type", "body", "detail"), [c[1:] for c in BROKEN_MULTIPART], ids=[c[0] for c in BROKEN_MULTIPART]
)
def test_broken_multipart_bodies_are_400_problems(
    client: TestClient, content_type: str, body: bytes, detail: str
) -> None:
    r = client.post(URL, content=body, headers={"Content-Type": content_type})
    assert_problem(r, 400, "about:blank", None, detail)


def test_a_charset_that_is_no_text_encoding_reads_as_latin1(client: TestClient) -> None:
    """`charset=base64` names a codec, not a text encoding: the fields are read as latin-1, as Starlette does."""
    body = _part("image", DOG.read_bytes(), "dog.jpg") + _part("spec", b'{"output": {"stages": [2]}}') + b"--xyz--\r\n"
    r = client.post(URL, content=body, headers={"Content-Type": MULTIPART + "; charset=base64"})
    assert r.status_code == 200, r.text
    assert [s["index"] for s in r.json()["stages"]] == [2]


@pytest.mark.parametrize(
    ("method", "path", "status"), [("GET", "/nope", 404), ("DELETE", "/healthz", 405), ("GET", URL, 405)]
)
def test_routing_errors_are_problems_too(client: TestClient, method: str, path: str, status: int) -> None:
    r = client.request(method, path)
    assert_problem(r, status, "about:blank", None, path)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_413(chunked: bool) -> None:
    with make_client(max_body_bytes=50_000) as small:
        payload = json.dumps(spec_with()).encode()  # ~35 KB of base64 + spec
        big = payload + b" " * 60_000
        content: Any = iter([big[i : i + 8192] for i in range(0, len(big), 8192)]) if chunked else big
        r = small.post(URL, content=content, headers={"Content-Type": "application/json"})
        assert_problem(r, 413, "limit-exceeded", None, "50,000")
        assert small.post(URL, content=payload, headers={"Content-Type": "application/json"}).status_code == 200


def refusals(client: TestClient) -> dict[str, int]:
    """`featuremap_refused_total` by reason, from /metrics."""
    text = client.get("/metrics").text
    return {m[1]: int(float(m[2])) for m in re.finditer(r'featuremap_refused_total\{reason="(\w+)"\} (\S+)', text)}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_past_the_workers_budget_is_a_503_problem_with_retry_after(chunked: bool) -> None:
    """The worker already holds nearly all of FEATUREMAP_MAX_BODY_BYTES_IN_FLIGHT (other uploads in flight, set
    here on the app's own budget): a body that does not fit gets the overloaded problem; one that does is served,
    and either way the budget is back where it was once the request has ended."""
    with make_client(max_body_bytes=50_000, max_body_bytes_in_flight=100_000) as client:
        [budget] = [m.kwargs["budget"] for m in client.app.user_middleware if m.cls is BodyLimitMiddleware]
        payload = json.dumps(spec_with()).encode()  # ~35 KB
        content: Any = iter([payload[i : i + 8192] for i in range(0, len(payload), 8192)]) if chunked else payload
        budget.held = 100_000 - 20_000
        r = client.post(URL, content=content, headers={"Content-Type": "application/json"})
        assert_problem(r, 503, "overloaded", None, "the most it holds at once is 100,000")
        assert r.headers["retry-after"] == "1"
        assert refusals(client)["request_bodies"] == 1
        assert budget.held == 80_000
        budget.held = 100_000 - len(payload)
        assert client.post(URL, content=payload, headers={"Content-Type": "application/json"}).status_code == 200
        assert budget.held == 100_000 - len(payload)


def test_a_response_past_the_workers_budget_is_a_503_problem_with_retry_after() -> None:
    """The worker already holds most of FEATUREMAP_MAX_RESPONSE_BYTES_IN_FLIGHT (large answers that slow clients
    have not taken yet, set here on the app's own budget): a large answer that does not fit gets the overloaded
    problem instead; one that fits is sent, and either way the budget is back where it was afterwards."""
    with make_client(max_response_bytes_in_flight=10_000_000) as client:
        budget = client.app_state["responses"]
        spec = {"spec": json.dumps({"output": {"format": "json"}})}  # the dog's three stages: about 7.5 MB
        budget.held = 5_000_000
        r = client.post(URL, files={"image": ("dog.jpg", DOG.read_bytes())}, data=spec)
        assert_problem(r, 503, "overloaded", None, "bytes of responses waiting to be sent")
        assert r.headers["retry-after"] == "1"
        assert refusals(client) == {**dict.fromkeys(REFUSAL_REASONS, 0), "responses": 1}
        assert budget.held == 5_000_000
        budget.held = 2_000_000
        r = client.post(URL, files={"image": ("dog.jpg", DOG.read_bytes())}, data=spec)
        assert r.status_code == 200 and len(r.content) > 2 * 1024 * 1024
        assert budget.held == 2_000_000


def test_pixel_limit_is_413() -> None:
    with make_client(max_image_pixels=10_000) as small:
        r = small.post(URL, files={"image": ("big.png", png(101, 100))})
        assert_problem(r, 413, "limit-exceeded", None, "10,100 pixels")


def test_work_limit_is_413() -> None:
    with make_client(max_macs=1_000_000) as small:
        r = small.post(URL, files={"image": ("dog.jpg", DOG.read_bytes())})
        assert_problem(r, 413, "limit-exceeded", "layers[0]", "multiply-adds")


def test_server_still_answers_after_the_error_table(client: TestClient) -> None:
    r = client.post(URL, files={"image": ("dog.jpg", DOG.read_bytes())}, data={"spec": '{"output": {"stages": [2]}}'})
    assert r.status_code == 200
    assert r.json()["stages"][0]["shape"] == [4, 148, 148]


@pytest.mark.parametrize("path", ["/v1/featuremaps", "/v1/predict", "/v1/models/cnn/featuremaps"])
@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate, gzip"])
def test_a_compressed_body_is_refused_with_a_415_where_it_would_be_read_as_it_came(
    client: TestClient, path: str, encoding: str
) -> None:
    body = gzip.compress(json.dumps(spec_with()).encode())
    r = client.post(path, content=body, headers={"Content-Type": "application/json", "Content-Encoding": encoding})
    assert_problem(r, 415, "unsupported-media-type", None, f"Content-Encoding {encoding!r} is not supported here")
    plain = client.post(path, json=spec_with(), headers={"Content-Encoding": "identity"})
    assert plain.status_code == 200, plain.text
