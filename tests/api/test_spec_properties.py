"""Property: any spec a client can send either runs (200, a valid response) or is refused with a 4xx problem."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.filters import BANKS, PRESETS
from service.schemas import FeaturemapsResponse
from tests.conftest import make_client

buf = io.BytesIO()
Image.new("RGB", (13, 11), (200, 40, 90)).save(buf, format="PNG")
IMAGE = base64.b64encode(buf.getvalue()).decode()

numbers = st.one_of(
    st.integers(-5, 5), st.floats(-1e3, 1e3, allow_nan=False), st.sampled_from([0.0, -0.0, 1e30, -1e30, 3e38])
)
junk = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.just([]), st.just({}))
scalars = st.one_of(numbers, junk)
kernels = st.one_of(
    st.lists(st.lists(numbers, min_size=1, max_size=4), min_size=1, max_size=4),  # 2-D, maybe ragged
    st.lists(st.lists(st.lists(numbers, min_size=2, max_size=2), min_size=2, max_size=2), min_size=1, max_size=3),
    st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=8),
)
filter_refs = st.one_of(
    st.sampled_from([*BANKS, *PRESETS, "nope"]),
    st.lists(
        st.one_of(
            st.sampled_from([*PRESETS, "nope"]),
            st.fixed_dictionaries({"kernel": kernels}, optional={"name": st.text(max_size=5)}),
        ),
        max_size=4,
    ),
    junk,
)
ints = st.one_of(st.integers(-2, 8), junk)
conv = st.fixed_dictionaries(
    {"op": st.just("conv"), "filters": filter_refs},
    optional={
        "stride": ints,
        "padding": st.one_of(st.sampled_from(["valid", "same", "full"]), ints),
        "padding_mode": st.sampled_from(["zeros", "reflect", "replicate", "circular", "mirror"]),
        "bias": st.one_of(numbers, st.lists(numbers, max_size=4), junk),
    },
)
pool = st.fixed_dictionaries(
    {"op": st.just("pool")},
    optional={"mode": st.sampled_from(["max", "avg", "min"]), "size": ints, "stride": ints},
)
activation = st.fixed_dictionaries(
    {"op": st.sampled_from(["relu", "leaky_relu", "sigmoid", "tanh", "abs", "gelu"])},
    optional={"negative_slope": numbers},
)
layers = st.lists(st.one_of(conv, pool, activation, junk, st.fixed_dictionaries({"op": scalars})), max_size=5)
specs = st.fixed_dictionaries(
    {"image": st.just(IMAGE)},
    optional={
        "color": st.sampled_from(["gray", "rgb", "hsv"]),
        "normalize": st.sampled_from(["unit", "none", "z"]),
        "layers": st.one_of(layers, junk),
        "output": st.fixed_dictionaries(
            {},
            optional={
                "format": st.sampled_from(["png", "json", "npy"]),
                "stages": st.one_of(st.just("all"), st.lists(ints, max_size=3), junk),
                "scale": st.sampled_from(["per_map", "per_stage", "none", "log"]),
                "colormap": st.sampled_from(["gray", "viridis", "coolwarm", "jet"]),
            },
        ),
        "device": st.sampled_from(["auto", "cpu", "cuda:9", "tpu"]),
    },
)


@pytest.fixture(scope="module")
def fuzz_client() -> Iterator[TestClient]:
    with make_client() as c:
        yield c


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(spec=specs)
def test_any_spec_runs_or_is_refused_with_a_4xx_problem(fuzz_client: TestClient, spec: dict[str, Any]) -> None:
    r = fuzz_client.post("/v1/featuremaps", json=spec)
    event(f"status {r.status_code}")
    if r.status_code == 200:
        FeaturemapsResponse.model_validate(r.json())
    else:
        assert r.status_code in (413, 415, 422), (r.status_code, r.text, spec)
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["detail"]
