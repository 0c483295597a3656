"""Health, readiness, the filter catalogue, and the OpenAPI document."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from scripts.export_openapi import OUT, render
from service.config import Settings
from service.main import create_app

REQUIRED_PRESETS = [
    "seed_1", "seed_2", "seed_3", "seed_4", "sobel_x", "sobel_y", "scharr_x", "scharr_y", "prewitt_x", "prewitt_y",
    "laplacian", "box_blur_3", "gaussian_3", "gaussian_5", "sharpen", "emboss", "identity",
]  # fmt: skip


def test_healthz(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_is_503_until_warm_up_finishes_then_200(held_warm_up: threading.Event) -> None:
    gate = held_warm_up
    with TestClient(create_app(Settings(warmup=True))) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"status": "starting"}
        assert c.get("/healthz").status_code == 200  # alive while not ready
        gate.set()
        readiness = c.app_state["readiness"]
        assert readiness.wait(30)
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_filters_lists_every_required_preset_with_kernel_and_description(client: TestClient) -> None:
    body = client.get("/v1/filters").json()
    by_name = {f["name"]: f for f in body["filters"]}
    assert set(REQUIRED_PRESETS) <= set(by_name)
    for f in by_name.values():
        assert f["description"] and np.asarray(f["kernel"]).ndim == 2
    assert by_name["sobel_x"]["kernel"] == [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
    assert by_name["laplacian"]["kernel"] == [[0, 1, 0], [1, -4, 1], [0, 1, 0]]
    np.testing.assert_allclose(by_name["gaussian_3"]["kernel"], np.outer([1, 2, 1], [1, 2, 1]) / 16, rtol=1e-7)
    banks = {b["name"]: b for b in body["banks"]}
    assert banks["seed4"]["filters"] == ["seed_1", "seed_2", "seed_3", "seed_4"]


def test_openapi_file_matches_the_app() -> None:
    assert OUT.read_text() == render(), "openapi/openapi.json is stale: run `make openapi`"


def test_openapi_documents_every_route_with_an_example_and_stable_ids(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    ops = {op["operationId"]: (path, method, op) for path, item in doc["paths"].items() for method, op in item.items()}
    assert {"check_liveness", "check_readiness", "list_filters", "compute_featuremaps"} <= set(ops)
    body = doc["paths"]["/v1/featuremaps"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert body["application/json"]["examples"]
    assert "FeaturemapsJSONRequest" in doc["components"]["schemas"]
    text = json.dumps(doc)
    for status in ("413", "415", "422"):
        assert status in doc["paths"]["/v1/featuremaps"]["post"]["responses"]
    assert "application/problem+json" in text


@pytest.mark.parametrize("path", ["/docs", "/openapi.json"])
def test_docs_are_served(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 200


def test_every_operation_has_a_worked_example(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]

    def has_example(schema: dict[str, Any], depth: int = 0) -> bool:
        """An example on the schema, on one of its fields, or (one level down) on a model it lists."""
        if "anyOf" in schema:
            return all(has_example(s, depth) for s in schema["anyOf"])
        ref = schema.get("$ref") or schema.get("items", {}).get("$ref")
        target = schemas[str(ref).rsplit("/", 1)[-1]] if ref else schema
        props = target.get("properties", {}).values()
        if "examples" in target or any("examples" in p for p in props):
            return True
        return depth < 1 and any(has_example(p, depth + 1) for p in props)

    for path, item in doc["paths"].items():
        for method, op in item.items():
            content = op["responses"]["200"]["content"]
            if "application/json" in content:
                assert has_example(content["application/json"]["schema"]), f"{method.upper()} {path}: no example"
            else:
                assert all("example" in c for c in content.values()), f"{method.upper()} {path}: no example"
            if "requestBody" in op:
                assert any("examples" in c or "example" in str(c) for c in op["requestBody"]["content"].values())


def test_every_problem_type_in_an_error_resolves_to_its_description(client: TestClient) -> None:
    listed = {p["type"]: p for p in client.get("/problems").json()}
    assert {"/problems/invalid-spec", "/problems/invalid-request", "/problems/overloaded"} <= set(listed)
    for type_uri, doc in listed.items():
        r = client.get(type_uri)
        assert r.status_code == 200 and r.json() == doc and doc["description"]
    bad = client.post("/v1/featuremaps", json={"image": "%%%"}).json()
    assert client.get(bad["type"]).json()["status"] == bad["status"] == 422
    missing = client.get("/problems/no-such-problem")
    assert missing.status_code == 404 and "GET /problems lists them" in missing.json()["detail"]
