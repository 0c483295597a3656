"""The MNIST side: data files, nets, the shipped weights against their cards, and digit preprocessing."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from service import classifiers, nets
from service.classifiers import MODELS_DIR, Preprocessed, preprocess_mnist, preprocess_none
from service.datasets import MNIST_DIR, DatasetError, load_mnist
from service.errors import DigitError
from service.train import export_onnx

RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def test_set():  # type: ignore[no-untyped-def]
    return load_mnist("test")


@pytest.fixture(scope="module")
def cnn() -> classifiers.Classifier:
    return classifiers.load_classifier("cnn")


def test_mnist_loads_verified_and_parsed(test_set) -> None:  # type: ignore[no-untyped-def]
    assert test_set.images.shape == (10_000, 28, 28) and test_set.images.dtype == np.uint8
    assert test_set.labels[:5].tolist() == [7, 2, 1, 0, 4]  # the widely published first test labels
    assert np.bincount(test_set.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert load_mnist("train").images.shape == (60_000, 28, 28)


def test_a_tampered_data_file_is_refused(tmp_path: Path) -> None:
    for f in MNIST_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    sums = (tmp_path / "SHA256SUMS").read_text().replace("0fa7898d", "00000000")
    (tmp_path / "SHA256SUMS").write_text(sums)
    with pytest.raises(DatasetError, match="does not match"):
        load_mnist("test", tmp_path)


def test_mlp_is_the_tutorials_784_512_512_10() -> None:
    mlp = nets.build("mlp")
    assert [(m.in_features, m.out_features) for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [
        (784, 512),
        (512, 512),
        (512, 10),
    ]
    assert mlp.dropout.p == 0.2


def test_cnn_is_small() -> None:
    cnn = nets.build("cnn")
    assert nets.parameter_count(cnn) <= 300_000
    assert cnn(torch.rand(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_shipped_weights_reproduce_their_cards(name: str, test_set) -> None:  # type: ignore[no-untyped-def]
    card = json.loads((MODELS_DIR / f"mnist-{name}.json").read_text())
    weights = MODELS_DIR / card["weights"]["file"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == card["weights"]["sha256"]
    classifier = classifiers.load_classifier(name)
    assert classifiers.evaluate(classifier.on(torch.device("cpu")), test_set) == card["test_accuracy"]
    assert card["test_accuracy"] >= {"mlp": 0.983, "cnn": 0.994}[name]
    assert card["parameters"] == nets.parameter_count(classifier.on(torch.device("cpu")))
    assert card["training"]["command"].startswith(f"python -m service.train {name}")
    assert card["torch_version"] and card["training"]["seed"] == 0 and not card["training"]["dry_run"]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_the_serving_net_labels_every_test_digit_as_the_module_does(name: str, test_set) -> None:  # type: ignore[no-untyped-def]
    """Predictions on the CPU run the net's ONNX graph in ONNX Runtime: the module's labels, so the card's accuracy
    holds for what is served; logits within float32 rounding; any batch size gives the same answer."""
    classifier = classifiers.load_classifier(name)
    module, serving = classifier.on(torch.device("cpu")), classifier.serving(torch.device("cpu"))
    assert serving is not module
    x = classifiers.to_input(test_set.images)
    with torch.inference_mode():
        expected = torch.cat([module(x[i : i + 1000]) for i in range(0, len(x), 1000)])
        got = torch.cat([serving(x[i : i + 1000]) for i in range(0, len(x), 1000)])
        assert torch.equal(got.argmax(1), expected.argmax(1))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        one_by_one = torch.cat([classifier.probabilities(x[i : i + 1]) for i in range(50)])
        odd_batch = classifier.probabilities(x[:50])
    torch.testing.assert_close(one_by_one, odd_batch, rtol=0, atol=1e-6)
    torch.testing.assert_close(odd_batch, torch.softmax(expected[:50], dim=1), rtol=0, atol=1e-6)
    assert classifier.serving(torch.device("cpu")) is serving  # made once
    # What /v1/predict calls: numpy in and out on the CPU, the same probabilities.
    digits = [classifiers.Preprocessed(pixels, "none", ()) for pixels in x[:50, 0].numpy()]
    predicted = np.stack([p.probabilities for p in classifier.predict(digits, torch.device("cpu"))])
    assert predicted.dtype == np.float32
    np.testing.assert_allclose(predicted, torch.softmax(expected[:50], dim=1).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "logits",
    [
        pytest.param([[0.0] * 10], id="all equal"),
        pytest.param([[47.0, -30.0, 2.5, 0.0, 1e-3, -1e-3, 12.0, 46.9, -88.0, 3.0]], id="a digit's range"),
        pytest.param([[1000.0, 999.0] + [-1000.0] * 8], id="large: exp would overflow without the max"),
        pytest.param([[-1000.0, -999.0] + [-2000.0] * 8], id="all very negative: would underflow"),
        pytest.param([[1.0] * 10, [5.0] + [0.0] * 9, [0.0] * 9 + [5.0]], id="rows on their own"),
    ],
)
def test_softmax_is_torchs(logits: list[list[float]]) -> None:
    z = np.array(logits, np.float32)
    got = classifiers.softmax(z.copy())
    assert got.dtype == np.float32 and got.shape == z.shape
    np.testing.assert_allclose(got, torch.softmax(torch.from_numpy(z), dim=1).numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.sum(axis=1), 1, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_the_shipped_graphs_are_the_exports_of_the_shipped_weights(name: str, tmp_path: Path) -> None:
    """`models/mnist-{name}.onnx` is what `python -m service.train {name} --export-only` makes of the weights beside
    it, to the byte, and the card holds its hash: a graph left stale by new weights (or a new exporter) fails here."""
    module = classifiers.load_classifier(name, graph=False).on(torch.device("cpu"))
    entry = export_onnx(module, tmp_path / f"mnist-{name}.onnx")
    assert (tmp_path / f"mnist-{name}.onnx").read_bytes() == (MODELS_DIR / f"mnist-{name}.onnx").read_bytes()
    assert json.loads((MODELS_DIR / f"mnist-{name}.json").read_text())["onnx"] == entry


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(lambda x: x.contiguous(memory_format=torch.channels_last), id="channels-last"),
        pytest.param(lambda x: torch.repeat_interleave(x, 2, dim=2)[:, :, ::2], id="strided view"),
    ],
)
def test_the_graph_takes_a_batch_in_any_layout(layout: Callable[[torch.Tensor], torch.Tensor]) -> None:
    classifier = classifiers.load_classifier("cnn")
    batch = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    serving = classifier.serving(torch.device("cpu"))
    assert torch.equal(serving(layout(batch)), serving(batch))


def test_a_batch_that_needs_gradients_runs_on_the_module() -> None:
    classifier = classifiers.load_classifier("cnn")
    batch = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)).requires_grad_()
    got = classifier.serving(torch.device("cpu"))(batch)
    assert got.requires_grad  # the graph gives none: the module ran, and its answer is the module's to the bit
    assert torch.equal(got, classifier.on(torch.device("cpu"))(batch))


def test_a_resize_to_the_same_size_is_a_copy_in_pillow() -> None:
    """`preprocess_mnist` skips the resize when the ink is already 20 px on its long side, because Pillow's resize
    to the image's own size returns its pixels unchanged, with either filter: if a Pillow release changed that,
    this fails, and the shortcut would no longer give Pillow's answer."""
    rng = np.random.default_rng(0)
    for shape in [(20, 20), (20, 7), (13, 20), (20, 1)]:
        crop = rng.random(shape, dtype=np.float32)
        for method in (Image.Resampling.BILINEAR, Image.Resampling.BOX):
            same = np.asarray(Image.fromarray(crop, "F").resize((shape[1], shape[0]), method))
            assert same.dtype == np.float32 and np.array_equal(same, crop)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_the_serving_net_for_another_device_is_made_without_deadlock(name: str) -> None:
    """A device other than the CPU gets its own copy of the module (made under the same lock); the meta device
    stands in for CUDA here. Run on a thread, so that a deadlock fails the test instead of hanging it."""
    classifier = classifiers.load_classifier(name)
    made: list[object] = []
    worker = threading.Thread(target=lambda: made.append(classifier.serving(torch.device("meta"))), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "serving() on a second device never returned: a deadlock"
    assert made == [classifier.on(torch.device("meta"))]
    assert next(classifier.on(torch.device("meta")).parameters()).device.type == "meta"


def test_a_card_without_a_graph_serves_the_module_on_the_cpu(tmp_path: Path) -> None:
    for f in MODELS_DIR.glob("mnist-mlp.*"):
        shutil.copy(f, tmp_path / f.name)
    card = json.loads((tmp_path / "mnist-mlp.json").read_text())
    del card["onnx"]
    (tmp_path / "mnist-mlp.json").write_text(json.dumps(card))
    (tmp_path / "mnist-mlp.onnx").unlink()
    classifier = classifiers.load_classifier("mlp", tmp_path)
    assert classifier.serving(torch.device("cpu")) is classifier.on(torch.device("cpu"))


def test_a_graph_whose_hash_differs_from_the_card_is_refused(tmp_path: Path) -> None:
    for f in MODELS_DIR.glob("mnist-cnn.*"):
        shutil.copy(f, tmp_path / f.name)
    graph = bytearray((tmp_path / "mnist-cnn.onnx").read_bytes())
    graph[-1] ^= 1
    (tmp_path / "mnist-cnn.onnx").write_bytes(bytes(graph))
    with pytest.raises(RuntimeError, match="mnist-cnn.onnx: SHA-256 does not match"):
        classifiers.load_classifier("cnn", tmp_path)
    assert classifiers.load_classifier("cnn", tmp_path, graph=False).onnx is None  # what --export-only reads


def test_weights_whose_hash_differs_from_the_card_are_refused(tmp_path: Path) -> None:
    for f in MODELS_DIR.glob("mnist-mlp.*"):
        shutil.copy(f, tmp_path / f.name)
    card = json.loads((tmp_path / "mnist-mlp.json").read_text())
    card["weights"]["sha256"] = "0" * 64
    (tmp_path / "mnist-mlp.json").write_text(json.dumps(card))
    with pytest.raises(RuntimeError, match="does not match"):
        classifiers.load_classifier("mlp", tmp_path)


# --- preprocessing ---------------------------------------------------------------------------------------------


def canvas(size: tuple[int, int], background: int | tuple[int, ...], mode: str = "L") -> Image.Image:
    return Image.new(mode, size, background)


def draw_seven(img: Image.Image, box: tuple[int, int, int, int], width: int, ink: int | tuple[int, ...]) -> Image.Image:
    x0, y0, x1, y1 = box
    d = ImageDraw.Draw(img)
    d.line([(x0, y0), (x1, y0), (x0 + (x1 - x0) // 3, y1)], fill=ink, width=width)
    return img


def assert_mnist_like(p: Preprocessed) -> None:
    """White digit on black, fits 20x20, centre of mass at the centre, full contrast."""
    px = p.pixels
    assert px.shape == (28, 28) and px.dtype == np.float32
    assert px.min() == 0.0 and px.max() == pytest.approx(1.0)
    rows, cols = np.nonzero(px > 0.05)
    assert rows.max() - rows.min() + 1 <= 21 and cols.max() - cols.min() + 1 <= 21
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 >= 18  # scaled up to the box
    ys, xs = np.indices(px.shape)
    cy, cx = (ys * px).sum() / px.sum(), (xs * px).sum() / px.sum()
    assert abs(cy - 14) <= 0.75 and abs(cx - 14) <= 0.75


CASES = {
    "dark on white": draw_seven(canvas((300, 300), 255), (60, 60, 240, 250), 18, 0),
    "light on black": draw_seven(canvas((300, 300), 0), (60, 60, 240, 250), 18, 255),
    "off-centre": draw_seven(canvas((500, 300), 255), (330, 20, 480, 140), 10, 0),
    "thin strokes": draw_seven(canvas((400, 400), 255), (50, 50, 350, 350), 2, 0),
    "thick strokes": draw_seven(canvas((300, 300), 255), (40, 40, 260, 260), 40, 0),
    "gray paper, gray pen": draw_seven(canvas((300, 300), 200), (60, 60, 240, 250), 14, 90),
    "RGB blue ink": draw_seven(canvas((300, 300), (250, 250, 240), "RGB"), (60, 60, 240, 250), 16, (20, 30, 160)),
    "RGBA dark strokes on transparent": draw_seven(
        canvas((280, 280), (0, 0, 0, 0), "RGBA"), (50, 50, 230, 240), 16, (0, 0, 0, 255)
    ),
    "RGBA white strokes on transparent": draw_seven(
        canvas((280, 280), (0, 0, 0, 0), "RGBA"), (50, 50, 230, 240), 16, (255, 255, 255, 255)
    ),
    "tiny": draw_seven(canvas((12, 12), 255), (2, 2, 10, 10), 1, 0),
    "small on a large page": draw_seven(canvas((2000, 1500), 255), (1700, 1200, 1790, 1300), 6, 0),
    "hair-thin on a huge canvas": draw_seven(canvas((4000, 4000), 255), (200, 200, 3800, 3800), 3, 0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_preprocess_mnist_makes_any_drawing_mnist_like(name: str, cnn: classifiers.Classifier) -> None:
    p = preprocess_mnist(CASES[name])
    assert_mnist_like(p)
    assert p.mode == "mnist" and p.steps[-1] == "centred by mass in 28x28"
    if name != "tiny":
        assert cnn.predict([p], torch.device("cpu"))[0].label == 7, p.steps


def test_preprocess_reports_inversion_and_thickening() -> None:
    assert "inverted (light background)" in preprocess_mnist(CASES["dark on white"]).steps
    assert "inverted (light background)" not in preprocess_mnist(CASES["light on black"]).steps
    assert any(s.startswith("strokes thickened") for s in preprocess_mnist(CASES["thin strokes"]).steps)
    assert not any(s.startswith("strokes thickened") for s in preprocess_mnist(CASES["thick strokes"]).steps)
    assert any("transparency" in s for s in preprocess_mnist(CASES["RGBA dark strokes on transparent"]).steps)


@pytest.mark.parametrize("img", [canvas((50, 50), 255), canvas((50, 50), 0), canvas((40, 40), (0, 0, 0, 0), "RGBA")])
def test_blank_images_are_digit_errors(img: Image.Image) -> None:
    with pytest.raises(DigitError, match="no digit"):
        preprocess_mnist(img)


def test_preprocess_mnist_leaves_an_mnist_digit_almost_unchanged(test_set) -> None:  # type: ignore[no-untyped-def]
    for i in range(20):
        p = preprocess_mnist(Image.fromarray(test_set.images[i]))
        assert np.abs(p.pixels - test_set.images[i] / 255).mean() < 0.08


def test_16_bit_digits_are_scaled_not_clipped() -> None:
    wide = np.zeros((28, 28), np.uint16)
    wide[6:22, 12:16] = 65535
    wide[0, 0] = 200 * 257
    p = preprocess_none(Image.fromarray(wide))
    assert p.pixels[10, 13] == 1.0 and p.pixels[0, 0] == pytest.approx(200 / 255)


def test_preprocess_none_scales_only_and_needs_28x28(test_set) -> None:  # type: ignore[no-untyped-def]
    p = preprocess_none(Image.fromarray(test_set.images[0]))
    np.testing.assert_array_equal(p.pixels, test_set.images[0].astype(np.float32) / np.float32(255))
    with pytest.raises(DigitError, match="28x28"):
        preprocess_none(canvas((29, 28), 0))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.full((28, 28), 255).tolist(), 255),
        (np.full((28, 28), 1.0).tolist(), 255),
        (np.full((28, 28), 0.5).tolist(), 128),
        (np.full((28, 28), 3).tolist(), 3),
    ],
)
def test_pixels_scale_is_0_255_or_0_1(values: list[list[float]], expected: int) -> None:
    assert int(classifiers.pixels_to_image(values)[0, 0]) == expected


@pytest.mark.parametrize(
    "values",
    [
        [[0] * 28] * 27,
        [[0] * 27] * 28,
        [[0] * 28] * 27 + [[0] * 27 + [float("nan")]],
        [[0] * 28] * 27 + [[0] * 27 + [256]],
        [[0] * 28] * 27 + [[-1] * 28],
        "x",
    ],
    ids=["27 rows", "27 columns", "nan", "over 255", "negative", "string"],
)
def test_bad_pixels_are_digit_errors(values: object) -> None:
    with pytest.raises(DigitError):
        classifiers.pixels_to_image(values)


def redrawn(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """An MNIST digit the way users send one: dark on white, several times larger, off-centre, as a JPEG."""
    side = int(28 * rng.uniform(4, 10))
    big = Image.fromarray(255 - digit).resize((side, side), Image.Resampling.BICUBIC)
    width, height = side + int(rng.integers(20, 300)), side + int(rng.integers(20, 300))
    page = Image.new("L", (width, height), 255)
    page.paste(big, (int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))))
    buf = io.BytesIO()
    page.convert("RGB").save(buf, "JPEG", quality=70)
    return buf.getvalue()


def test_cnn_keeps_97_percent_on_redrawn_test_digits(test_set, cnn: classifiers.Classifier) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    n = 1000
    digits = [classifiers.prepare_digit(redrawn(test_set.images[i], rng), "mnist", 10**8, ("image",)) for i in range(n)]
    predictions = cnn.predict(digits, torch.device("cpu"))
    accuracy = np.mean([p.label == test_set.labels[i] for i, p in enumerate(predictions)])
    assert accuracy >= 0.97, accuracy


@pytest.mark.parametrize("size", [1, 2, 3, 4, 111, 112, 4000])
@pytest.mark.parametrize("low", [0, 200, 255])
def test_the_background_median_equals_numpys(size: int, low: int) -> None:
    """The background level comes from a histogram, not a sort: it must be np.median's value, odd or even."""
    rng = np.random.default_rng(size + low)
    for _ in range(20):
        levels = rng.integers(low, 256, size, dtype=np.uint8)
        assert classifiers._median_level(levels) == float(np.median(levels))


@pytest.mark.parametrize(
    "levels",
    [
        pytest.param(np.array([7], np.uint8), id="one value"),
        pytest.param(np.array([0, 255], np.uint8), id="two: the mean of the middle pair"),
        pytest.param(np.array([3, 1, 2], np.uint8), id="odd count"),
        pytest.param(np.random.default_rng(0).integers(0, 256, 4096).astype(np.uint8), id="the most sorted"),
        pytest.param(np.random.default_rng(1).integers(0, 256, 4097).astype(np.uint8), id="the fewest counted"),
        pytest.param(np.random.default_rng(2).integers(250, 256, 50_001).astype(np.uint8), id="many, odd count"),
        pytest.param(np.r_[np.zeros(5000, np.uint8), np.full(5000, 201, np.uint8)], id="many, a split middle"),
    ],
)
def test_the_border_s_median_level_is_numpy_s_median(levels: np.ndarray) -> None:
    """The background level is the border's median, taken by a sort for a small image's border and from a
    histogram for a large one: both are numpy's median."""
    assert classifiers._median_level(levels) == np.median(levels)


def test_index_grids_are_numpy_s_and_read_only() -> None:
    grids = classifiers._index_grids((20, 13))
    assert np.array_equal(grids, np.indices((20, 13))) and classifiers._index_grids((20, 13)) is grids
    with pytest.raises(ValueError, match="read-only"):
        grids[0, 0, 0] = 1  # shared by every digit of this shape: nobody may change it
