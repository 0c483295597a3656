"""The pipeline core against independent references: scipy/numpy for every op, padding mode and stride,
OpenCV for the tutorial's filter2D, and the tutorial's own torch code for the default pipeline."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
import scipy.ndimage as ndi
import scipy.signal as sps
import torch
import torch.nn as nn
import torch.nn.functional as F

from service import imaging, pipeline
from service.errors import LimitExceededError, PipelineSpecError
from service.filters import BANKS, PRESETS
from service.pipeline import Activation, Conv, Filter, Limits, PipelineSpec, Pool
from tests.conftest import DOG

RNG = np.random.default_rng(20261130)
_NP_PAD = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
_NDI_MODE = {"zeros": "constant", "reflect": "mirror", "replicate": "nearest", "circular": "wrap"}


def ref_conv2d(img: np.ndarray, k: np.ndarray, padding: str | int, mode: str, stride: int) -> np.ndarray:
    """One channel, one kernel, in float64, by scipy: `same` via ndimage (centre anchor, like filter2D)."""
    if padding == "same":
        out = ndi.correlate(img.astype(np.float64), k.astype(np.float64), mode=_NDI_MODE[mode], cval=0.0)
    else:
        p = 0 if padding == "valid" else int(padding)
        padded = np.pad(img.astype(np.float64), p, mode=_NP_PAD[mode]) if p else img.astype(np.float64)
        out = sps.correlate2d(padded, k.astype(np.float64), mode="valid")
    return out[::stride, ::stride]


def run(layer: pipeline.Layer, x: np.ndarray, device: torch.device) -> np.ndarray:
    return pipeline.run_layer(layer, torch.from_numpy(x).to(device)).cpu().numpy()


KERNELS = {
    "3x3": RNG.standard_normal((3, 3)).astype(np.float32),
    "4x4": RNG.standard_normal((4, 4)).astype(np.float32),
    "2x5": RNG.standard_normal((2, 5)).astype(np.float32),
    "1x1": RNG.standard_normal((1, 1)).astype(np.float32),
}


@pytest.mark.parametrize(
    ("kernel", "padding", "mode", "stride"),
    list(itertools.product(KERNELS, ["valid", "same", 0, 2], pipeline.PADDING_MODES, [1, 2, 3])),
)
def test_conv_matches_scipy_for_every_padding_mode_and_stride(
    kernel: str, padding: str | int, mode: str, stride: int, device: torch.device
) -> None:
    img = RNG.random((1, 13, 17), dtype=np.float32)
    k = KERNELS[kernel]
    layer = Conv((Filter("k", k),), stride=stride, padding=padding, padding_mode=mode)  # type: ignore[arg-type]
    got = run(layer, img, device)
    want = ref_conv2d(img[0], k, padding, mode, stride)
    assert got.shape == (1, *want.shape)
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["3x3", "4x4", "2x5"])
def test_same_reflect_equals_opencv_filter2d_default_border(kernel: str) -> None:
    img = RNG.random((1, 20, 24), dtype=np.float32)
    k = KERNELS[kernel]
    got = run(Conv((Filter("k", k),), padding="same", padding_mode="reflect"), img, torch.device("cpu"))
    want = cv2.filter2D(img[0], -1, k)  # BORDER_REFLECT_101, anchor at the kernel centre
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("preset", "reference"),
    [
        ("sobel_x", lambda im: cv2.Sobel(im, cv2.CV_32F, 1, 0, ksize=3)),
        ("sobel_y", lambda im: cv2.Sobel(im, cv2.CV_32F, 0, 1, ksize=3)),
        ("scharr_x", lambda im: cv2.Scharr(im, cv2.CV_32F, 1, 0)),
        ("scharr_y", lambda im: cv2.Scharr(im, cv2.CV_32F, 0, 1)),
        ("laplacian", lambda im: cv2.Laplacian(im, cv2.CV_32F, ksize=1)),
        ("box_blur_3", lambda im: cv2.blur(im, (3, 3))),
        ("gaussian_3", lambda im: cv2.GaussianBlur(im, (3, 3), 0)),
        ("gaussian_5", lambda im: cv2.GaussianBlur(im, (5, 5), 0)),
        ("identity", lambda im: im),
    ],
)
def test_presets_follow_opencv_conventions(preset: str, reference: object) -> None:
    img = RNG.random((1, 16, 16), dtype=np.float32)
    got = run(
        Conv((Filter(preset, PRESETS[preset].kernel),), padding="same", padding_mode="reflect"),
        img,
        torch.device("cpu"),
    )
    np.testing.assert_allclose(got[0], reference(img[0]), rtol=1e-5, atol=1e-5)  # type: ignore[operator]


def test_sobel_x_is_positive_where_brightness_grows_to_the_right() -> None:
    ramp = np.tile(np.arange(8, dtype=np.float32), (1, 8, 1))  # brighter to the right
    got = run(Conv((Filter("sobel_x", PRESETS["sobel_x"].kernel),)), ramp, torch.device("cpu"))
    assert (got > 0).all()


def test_seed_bank_is_the_tutorials_four_filters() -> None:
    base = np.array([[-1, -1, 1, 1]] * 4, dtype=np.float32)
    want = [base, -base, base.T, -base.T]
    assert BANKS["seed4"].filters == ("seed_1", "seed_2", "seed_3", "seed_4")
    for name, w in zip(BANKS["seed4"].filters, want, strict=True):
        np.testing.assert_array_equal(PRESETS[name].kernel, w)


@pytest.mark.parametrize("sizes", ["one conv", "one conv per size"])
def test_2d_kernels_filter_each_channel_filter_major(sizes: str, device: torch.device) -> None:
    img = RNG.random((3, 9, 11), dtype=np.float32)
    ka = KERNELS["3x3"]
    kb = KERNELS["4x4"] if sizes == "one conv per size" else RNG.standard_normal((3, 3)).astype(np.float32)
    layer = Conv((Filter("a", ka), Filter("b", kb)), padding="same")
    got = run(layer, img, device)
    want = [ref_conv2d(img[c], k, "same", "zeros", 1) for k in (ka, kb) for c in range(3)]
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-5)


def test_3d_kernels_alone_are_one_conv_in_request_order(device: torch.device) -> None:
    img = RNG.random((3, 9, 11), dtype=np.float32)
    ks = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    got = run(Conv(tuple(Filter(str(i), k) for i, k in enumerate(ks))), img, device)
    want = [sum(ref_conv2d(img[c], k[c], "valid", "zeros", 1) for c in range(3)) for k in ks]
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-5)


def test_3d_kernel_sums_over_channels_like_conv2d(device: torch.device) -> None:
    img = RNG.random((3, 9, 11), dtype=np.float32)
    k = RNG.standard_normal((3, 3, 3)).astype(np.float32)
    got = run(Conv((Filter("rgb", k), Filter("sobel", PRESETS["sobel_x"].kernel))), img, device)
    want_rgb = sum(ref_conv2d(img[c], k[c], "valid", "zeros", 1) for c in range(3))
    assert got.shape == (4, 7, 9)
    np.testing.assert_allclose(got[0], want_rgb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], ref_conv2d(img[0], PRESETS["sobel_x"].kernel, "valid", "zeros", 1), atol=1e-5)


def test_bias_is_added_per_filter_to_each_of_its_maps(device: torch.device) -> None:
    img = RNG.random((2, 6, 6), dtype=np.float32)
    k = KERNELS["3x3"]
    got = run(Conv((Filter("a", k), Filter("b", -k)), bias=(0.5, -2.0)), img, device)
    plain = run(Conv((Filter("a", k), Filter("b", -k))), img, device)
    np.testing.assert_allclose(
        got - plain, np.array([0.5, 0.5, -2.0, -2.0])[:, None, None] * np.ones_like(got), atol=1e-6
    )


def test_mixed_kernel_sizes_with_same_padding_keep_request_order(device: torch.device) -> None:
    img = RNG.random((1, 10, 10), dtype=np.float32)
    ks = [KERNELS["3x3"], KERNELS["4x4"], KERNELS["1x1"]]
    got = run(Conv(tuple(Filter(str(i), k) for i, k in enumerate(ks)), padding="same"), img, device)
    for i, k in enumerate(ks):
        np.testing.assert_allclose(got[i], ref_conv2d(img[0], k, "same", "zeros", 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "ref"),
    [
        ("relu", lambda x: np.maximum(x, 0)),
        ("leaky_relu", lambda x: np.where(x > 0, x, 0.2 * x)),
        ("sigmoid", lambda x: 1 / (1 + np.exp(-x))),
        ("tanh", np.tanh),
        ("abs", np.abs),
    ],
)
def test_activations_match_numpy(kind: str, ref: object, device: torch.device) -> None:
    x = RNG.standard_normal((2, 5, 7)).astype(np.float32) * 3
    got = run(Activation(kind, negative_slope=0.2), x, device)  # type: ignore[arg-type]
    np.testing.assert_allclose(got, ref(x.astype(np.float64)), rtol=1e-6, atol=1e-6)  # type: ignore[operator]


def ref_pool(x: np.ndarray, mode: str, size: int, stride: int) -> np.ndarray:
    c, h, w = x.shape
    oh, ow = (h - size) // stride + 1, (w - size) // stride + 1
    out = np.empty((c, oh, ow))
    for i, j in itertools.product(range(oh), range(ow)):
        win = x[:, i * stride : i * stride + size, j * stride : j * stride + size].reshape(c, -1)
        out[:, i, j] = win.max(axis=1) if mode == "max" else win.mean(axis=1)
    return out


@pytest.mark.parametrize(
    ("mode", "size", "stride"),
    [("max", 2, None), ("avg", 2, None), ("max", 3, 2), ("avg", 3, 1), ("max", 1, 1), ("avg", 5, 5), ("max", 2, 3)],
)
def test_pool_matches_numpy_in_floor_mode(mode: str, size: int, stride: int | None, device: torch.device) -> None:
    x = RNG.standard_normal((3, 11, 13)).astype(np.float32)
    got = run(Pool(mode, size, stride), x, device)  # type: ignore[arg-type]
    np.testing.assert_allclose(got, ref_pool(x, mode, size, stride or size), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("shape", [(3, 11, 13), (2, 3, 3), (1, 4, 9), (16, 64, 65)])
def test_max_pools_on_the_cpu_give_max_pool2d_s_values_exactly(size: int, shape: tuple[int, int, int]) -> None:
    """Non-overlapping 2x2 and 3x3 windows run as a maximum of strided slices: max_pool2d's values, to the bit,
    with a partial last window dropped, ties, infinities and NaN (which propagates) included."""
    if shape[1] < size:
        pytest.skip("the plan refuses a window larger than its input")
    x = torch.from_numpy(RNG.standard_normal(shape).astype(np.float32))
    x[0, 0, :2] = 0.5  # ties within a window
    x[-1, -1, -1] = float("inf")
    x[0, 1, 1] = float("-inf")
    x[-1, 0, 0] = float("nan")
    got = pipeline.run_layer(Pool("max", size), x)
    want = F.max_pool2d(x.unsqueeze(0), size, size)[0]
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got.isnan(), want.isnan()) and bool(got.isnan().any())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
    np.testing.assert_array_equal(got.numpy(), ref_pool(x.numpy(), "max", size, size).astype(np.float32))


@pytest.mark.parametrize(
    ("activation", "pool", "pooled_first"),
    [
        (Activation("relu"), Pool("max", 2), True),
        (Activation("relu"), Pool("max", 3, 1), True),
        (Activation("leaky_relu", negative_slope=0.2), Pool("max", 2), True),
        (Activation("leaky_relu", negative_slope=-0.5), Pool("max", 2), False),
        (Activation("relu"), Pool("avg", 2), False),
        (Activation("abs"), Pool("max", 2), False),
        (Activation("sigmoid"), Pool("max", 2), False),
    ],
)
def test_an_activation_not_asked_for_runs_after_the_max_pool_it_commutes_with(
    activation: Activation, pool: Pool, pooled_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = PipelineSpec(layers=(Conv((Filter("a", KERNELS["3x3"]), Filter("b", -KERNELS["3x3"]))), activation, pool))
    x = torch.from_numpy(RNG.standard_normal((1, 17, 19)).astype(np.float32))
    every = pipeline.run_pipeline(x, spec, Limits())
    seen: list[tuple[str, tuple[int, ...]]] = []
    real = pipeline.run_layer

    def recording(layer: pipeline.Layer, maps: torch.Tensor) -> torch.Tensor:
        seen.append((layer.op, tuple(maps.shape)))
        return real(layer, maps)

    monkeypatch.setattr(pipeline, "run_layer", recording)
    last = pipeline.run_pipeline(x, spec, Limits(), stages=[2])
    assert [s.plan.index for s in last.stages] == [2]
    assert torch.equal(last.stages[0].maps, every.stages[2].maps)  # the same values either way
    order = [op for op, _ in seen]
    assert order == (["conv", "pool", activation.op] if pooled_first else ["conv", activation.op, "pool"])
    seen.clear()
    pipeline.run_pipeline(x, spec, Limits(), stages=[1, 2])  # the activation's maps asked for: in order
    assert [op for op, _ in seen] == ["conv", activation.op, "pool"]


def test_default_pipeline_reproduces_the_tutorial_notebook_exactly(device: torch.device) -> None:
    """The notebook: cv2 gray /255 -> Conv2d(1, 4, 4, bias=False) with the seed filters -> relu -> MaxPool2d(2, 2)."""
    bgr = cv2.imread(str(DOG))
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype("float32") / 255
    filter_vals = np.array([[-1, -1, 1, 1], [-1, -1, 1, 1], [-1, -1, 1, 1], [-1, -1, 1, 1]])
    filters = np.array([filter_vals, -filter_vals, filter_vals.T, -filter_vals.T])
    conv = nn.Conv2d(1, 4, kernel_size=(4, 4), bias=False)
    conv.weight = nn.Parameter(torch.from_numpy(filters).unsqueeze(1).type(torch.FloatTensor))
    with torch.no_grad():
        conv_x = conv(torch.from_numpy(gray).unsqueeze(0).unsqueeze(1))
        activated_x = F.relu(conv_x)
        pooled_x = nn.MaxPool2d(2, 2)(activated_x)

    x = imaging.image_to_tensor(imaging.decode_image(DOG.read_bytes(), 10**8), "gray", "unit")
    assert torch.equal(x[0], torch.from_numpy(gray))
    result = pipeline.run_pipeline(x.to(device), PipelineSpec(), Limits())
    assert [s.plan.op for s in result.stages] == ["conv", "relu", "pool"]
    for got, want in zip(result.stages, (conv_x, activated_x, pooled_x), strict=True):
        assert got.maps.shape == want[0].shape
        if device.type == "cpu":
            assert torch.equal(got.maps, want[0])
        else:
            torch.testing.assert_close(got.maps.cpu(), want[0], rtol=1e-5, atol=1e-5)
    # and against scipy, independent of torch
    for f in range(4):
        want = np.maximum(sps.correlate2d(gray.astype(np.float64), filters[f], mode="valid"), 0)
        pooled = want[: want.shape[0] // 2 * 2, : want.shape[1] // 2 * 2].reshape(148, 2, 148, 2).max(axis=(1, 3))
        np.testing.assert_allclose(result.stages[2].maps[f].cpu().numpy(), pooled, atol=1e-5)


def test_plan_labels_channels_and_shapes() -> None:
    spec = PipelineSpec(
        color="rgb",
        layers=(
            Conv(pipeline.bank("sobel"), padding="same"),
            Activation(),
            Pool("max", 2),
            Conv(pipeline.bank("seed4")),
        ),
    )
    plans = pipeline.plan(spec, 20, 30, Limits())
    assert [p.shape for p in plans] == [(6, 20, 30), (6, 20, 30), (6, 10, 15), (24, 7, 12)]
    assert plans[0].channels[:4] == ("sobel_x(R)", "sobel_x(G)", "sobel_x(B)", "sobel_y(R)")
    assert plans[3].channels[0] == "seed_1(sobel_x(R))"
    gray = pipeline.plan(PipelineSpec(), 300, 300, Limits())
    assert [p.shape for p in gray] == [(4, 297, 297), (4, 297, 297), (4, 148, 148)]
    assert gray[0].channels == ("seed_1", "seed_2", "seed_3", "seed_4")


def test_run_pipeline_returns_only_requested_stages_in_request_order() -> None:
    x = torch.rand(1, 12, 12)
    result = pipeline.run_pipeline(x, PipelineSpec(), Limits(), stages=[2, 0])
    assert [s.plan.index for s in result.stages] == [2, 0]
    assert list(result.filters) == [0]


def _spec(*layers: pipeline.Layer, color: str = "gray") -> PipelineSpec:
    return PipelineSpec(color=color, layers=layers)  # type: ignore[arg-type]


K3 = (Filter("k", KERNELS["3x3"]),)

# fmt: off
SPEC_ERRORS = [
    ("kernel larger than input", _spec(Conv((Filter("big", np.ones((9, 9), np.float32)),))), ("layers", 0, "filters", 0, "kernel"), "larger than"),
    ("pool larger than input", _spec(Pool("max", 9)), ("layers", 0, "size"), "larger than its 8x8 input"),
    ("zero pool stride", _spec(Pool("max", 2, 0)), ("layers", 0, "stride"), "at least 1"),
    ("zero conv stride", _spec(Conv(K3, stride=0)), ("layers", 0, "stride"), "at least 1"),
    ("negative padding", _spec(Conv(K3, padding=-1)), ("layers", 0, "padding"), "non-negative"),
    ("reflect padding too wide", _spec(Conv(K3, padding=8, padding_mode="reflect")), ("layers", 0, "padding"), "reflect"),
    ("3-D kernel channel mismatch", _spec(Conv((Filter("c", np.ones((2, 3, 3), np.float32)),))), ("layers", 0, "filters", 0, "kernel"), "one slice per input channel"),
    ("bias count", _spec(Conv(K3, bias=(1.0, 2.0))), ("layers", 0, "bias"), "2 values for 1 filters"),
    ("mixed sizes, valid", _spec(Conv((*K3, Filter("k4", KERNELS["4x4"])))), ("layers", 0, "filters"), "one size"),
    ("no layers", _spec(), ("layers",), "at least one"),
    ("no filters", _spec(Conv(())), ("layers", 0, "filters"), "at least one"),
]
# fmt: on


@pytest.mark.parametrize(("spec", "loc", "fragment"), [c[1:] for c in SPEC_ERRORS], ids=[c[0] for c in SPEC_ERRORS])
def test_plan_rejects_specs_that_cannot_run(spec: PipelineSpec, loc: tuple[object, ...], fragment: str) -> None:
    with pytest.raises(PipelineSpecError) as e:
        pipeline.plan(spec, 8, 8, Limits())
    assert e.value.issues[0].loc == loc
    assert fragment in e.value.issues[0].msg


# fmt: off
LIMIT_ERRORS = [
    ("layers", Limits(max_layers=2), _spec(Activation(), Activation(), Activation()), ("layers",)),
    ("filters", Limits(max_filters_per_conv=1), _spec(Conv((*K3, *K3))), ("layers", 0, "filters")),
    ("kernel side", Limits(max_kernel_size=2), _spec(Conv(K3)), ("layers", 0, "filters", 0)),
    ("output elements", Limits(max_output_elements=100), _spec(Activation(), Activation()), ("layers", 1)),
    ("work", Limits(max_macs=10), _spec(Conv(K3)), ("layers", 0)),
    # One 1x1 output, but a 28x28 padded copy of the 8x8 input: 720 elements more
    ("padding", Limits(max_output_elements=719), _spec(Conv((Filter("one", np.ones((1, 1), np.float32)),), stride=99, padding=10)), ("layers", 0, "padding")),
]
# fmt: on


@pytest.mark.parametrize(("limits", "spec", "loc"), [c[1:] for c in LIMIT_ERRORS], ids=[c[0] for c in LIMIT_ERRORS])
def test_plan_enforces_limits_naming_the_stage(limits: Limits, spec: PipelineSpec, loc: tuple[object, ...]) -> None:
    with pytest.raises(LimitExceededError) as e:
        pipeline.plan(spec, 8, 8, limits)
    assert e.value.loc == loc


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ([], "empty"),
        ([[]], "empty"),
        ([[1, 2], [3]], "ragged"),
        ([[1, "a"], [2, 3]], "non-numeric"),
        ([[1, True], [2, 3]], "non-numeric"),
        ([[1, float("nan")], [2, 3]], "non-finite"),
        ([[1, float("inf")], [2, 3]], "non-finite"),
        ([1, 2, 3], "2-D"),
        (5, "2-D"),
        ([[[[1]]]], "4-D"),
        ([[1e39, 0], [0, 0]], "too large"),
    ],
)
def test_parse_kernel_rejects_bad_kernels_precisely(value: object, fragment: str) -> None:
    with pytest.raises(PipelineSpecError) as e:
        pipeline.parse_kernel(value, ("layers", 0, "filters", 1, "kernel"))
    assert e.value.issues[0].loc == ("layers", 0, "filters", 1, "kernel")
    assert fragment in e.value.issues[0].msg


def test_resolve_filters_lists_known_presets_for_an_unknown_name() -> None:
    with pytest.raises(PipelineSpecError) as e:
        pipeline.resolve_filters(["sobel_x", "sobel_z", ("mine", [[1]])], ("layers", 0, "filters"))
    issue = e.value.issues[0]
    assert issue.loc == ("layers", 0, "filters", 1)
    assert "sobel_z" in issue.msg and "seed4" in issue.msg and "gaussian_5" in issue.msg


def test_overflow_to_infinity_is_a_spec_error_not_a_response_with_inf() -> None:
    huge = Filter("huge", np.full((3, 3), 3e38, np.float32))
    with pytest.raises(PipelineSpecError) as e:
        pipeline.run_pipeline(torch.ones(1, 8, 8), _spec(Conv((huge,))), Limits())
    assert e.value.issues[0].loc == ("layers", 0)


def test_each_stage_carries_its_own_extremes(device: torch.device) -> None:
    """The `min` and `max` a response shows come from the pipeline's one pass over each stage: they are the maps'."""
    image = torch.from_numpy(RNG.standard_normal((1, 20, 24)).astype(np.float32)).to(device)
    filters = tuple(Filter(f"k{i}", RNG.standard_normal((3, 3)).astype(np.float32)) for i in range(4))
    result = pipeline.run_pipeline(image, _spec(Conv(filters), Activation("relu"), Pool("max", 2)), Limits())
    assert [s.plan.index for s in result.stages] == [0, 1, 2]
    for stage in result.stages:
        maps = stage.maps.cpu().numpy()
        assert (stage.lo, stage.hi) == (float(maps.min()), float(maps.max()))
