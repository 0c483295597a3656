"""The MNIST classifiers at serving time: load weights and model cards, preprocess digits, predict."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from service import imaging, nets
from service.datasets import Digits
from service.errors import (
    DigitError,
    FeatureMapError,
    Loc,
    ModelsLoadingError,
    NoFeatureMapsError,
    UnknownModelError,
)
from service.pipeline import Filter, PipelineResult, StagePlan, StageResult, check_stage_indices

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def to_input(images: np.ndarray) -> torch.Tensor:
    """`(N, 28, 28)` uint8 -> `(N, 1, 28, 28)` float32 in [0, 1] (ToTensor's scaling)."""
    return torch.from_numpy(images.astype(np.float32) / np.float32(255)).unsqueeze(1)


@torch.inference_mode()
def evaluate(model: nn.Module, digits: Digits, batch_size: int = 1000) -> float:
    """Accuracy on `digits`, as a fraction; the same batching every time, so it is reproducible."""
    was_training = model.training
    model.eval()
    x, y = to_input(digits.images), torch.from_numpy(digits.labels.astype("int64"))
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
        for i in range(0, len(y), batch_size)
    )
    model.train(was_training)
    return correct / len(y)


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """Each leaf layer in forward order: name, type, output shape for one digit, parameter count."""
    rows: list[dict[str, Any]] = []
    hooks = []
    for name, module in model.named_modules():
        if name and not list(module.children()) and not isinstance(module, nn.Dropout):

            def hook(m: nn.Module, _: Any, out: torch.Tensor, name: str = name) -> None:
                rows.append(
                    {
                        "name": name,
                        "type": type(m).__name__,
                        "output_shape": list(out.shape[1:]),
                        "parameters": sum(p.numel() for p in m.parameters()),
                    }
                )

            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        model(torch.zeros(1, 1, 28, 28))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return rows


# --- preprocessing a real picture of a digit -------------------------------------------------------------------

MNIST_BOX = 20  # MNIST digits were scaled to fit 20x20 ...
MNIST_SIZE = 28  # ... and centred by mass in 28x28
_INK_THRESHOLD = 0.2  # of the stretched range: what counts as ink for the bounding box
_STROKE_FRACTION = 0.1  # MNIST strokes are about 2 px of the 20 px box
_WORK_SIDE = 200  # larger crops are first shrunk to this (area-averaged), so work is bounded for any upload


@dataclass(frozen=True)
class Preprocessed:
    """A digit as the model sees it, and what was done to get there."""

    pixels: np.ndarray  # (28, 28) float32 in [0, 1], white digit on black
    mode: str
    steps: tuple[str, ...]


def preprocess_none(img: Image.Image) -> Preprocessed:
    """An image that is already 28x28 MNIST-style (white on black): grayscale and scale to [0, 1] only."""
    if img.size != (MNIST_SIZE, MNIST_SIZE):
        raise DigitError(f"preprocess 'none' needs a 28x28 image, got {img.width}x{img.height}; use 'mnist'")
    gray = imaging.to_8bit_array(_flatten_alpha(img, []), "L").astype(np.float32) / np.float32(255)
    return Preprocessed(gray, "none", ("grayscale", "scaled to [0, 1]"))


def preprocess_mnist(img: Image.Image) -> Preprocessed:
    """What the MNIST authors did to their scans, for photos and canvas drawings of one digit.

    Grayscale; invert when the background is light; subtract the background and stretch the ink to full range;
    thicken strokes that would vanish when shrunk; crop to the ink's bounding box; scale to fit 20x20 keeping
    the aspect ratio (area-averaged); paste into 28x28 with the centre of mass at the centre.
    """
    steps: list[str] = []
    levels = imaging.to_8bit_array(_flatten_alpha(img, steps), "L")  # (H, W) uint8
    gray = levels.astype(np.float32)
    steps.append("grayscale")
    background = _median_level(_border(levels))
    if background > 127:
        gray, background = 255 - gray, 255 - background  # the border's median, inverted: exactly
        steps.append("inverted (light background)")
    ink = np.maximum(gray - background, 0)  # np.maximum and np.minimum: the same values as np.clip, in half the time
    # A high percentile ignores a few hot pixels; a digit drawn small on a large page has too little ink for it.
    peak = float(np.percentile(ink, 99.9)) if ink.size > 1000 else 0.0
    peak = peak if peak >= 24 else float(ink.max())
    if peak < 24:
        raise DigitError("no digit found: the image has no ink that stands out from its background")
    ink = np.minimum(ink / peak, 1)  # from 0 up already
    steps.append("background removed, contrast stretched")
    rows, cols = np.nonzero(ink > _INK_THRESHOLD)  # rows come in order
    top, bottom, left, right = rows[0], rows[-1] + 1, cols.min(), cols.max() + 1
    crop = ink[top:bottom, left:right]
    steps.append(f"cropped to the ink: {right - left}x{bottom - top} at ({left}, {top})")
    if max(crop.shape) > _WORK_SIDE:  # work at a bounded size: thickening below costs side x k per pixel
        ratio = _WORK_SIDE / max(crop.shape)
        size = (max(1, round(crop.shape[1] * ratio)), max(1, round(crop.shape[0] * ratio)))
        crop = np.asarray(Image.fromarray(crop, "F").resize(size, Image.Resampling.BOX))
        crop = crop / max(float(crop.max()), 1e-6)
    side = max(crop.shape)
    wanted = _STROKE_FRACTION * side
    if side > MNIST_BOX and (width := _stroke_width(crop > 0.5)) < 0.6 * wanted:  # only shrinking thins strokes
        k = int(round(wanted - width)) | 1  # odd
        crop = _dilate(crop, k)
        steps.append(f"strokes thickened ({width:.1f} px -> ~{width + k - 1:.1f} px of {side})")
    scale = MNIST_BOX / side
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    crop = crop.astype(np.float32, copy=False)  # Pillow's "F"
    if size == (crop.shape[1], crop.shape[0]):  # already 20 px on its long side (MNIST's own digits): as Pillow,
        small = crop  # whose resize to the same size is a copy; within [0, 1] already, as the ink
    else:
        method = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
        small = np.clip(np.asarray(Image.fromarray(crop, "F").resize(size, method)), 0, 1)
    top_level = small.max()
    if top_level > 0:
        small = small / top_level
    steps.append(f"scaled to {size[0]}x{size[1]} (fits 20x20)")
    out = np.zeros((MNIST_SIZE, MNIST_SIZE), np.float32)
    total = small.sum()
    ys, xs = _index_grids(small.shape)
    cy, cx = (ys * small).sum() / total, (xs * small).sum() / total
    oy, ox = int(round(MNIST_SIZE / 2 - cy)), int(round(MNIST_SIZE / 2 - cx))
    y0, x0 = max(oy, 0), max(ox, 0)
    y1, x1 = min(oy + small.shape[0], MNIST_SIZE), min(ox + small.shape[1], MNIST_SIZE)
    out[y0:y1, x0:x1] = small[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    steps.append("centred by mass in 28x28")
    return Preprocessed(out, "mnist", tuple(steps))


def _flatten_alpha(img: Image.Image, steps: list[str]) -> Image.Image:
    """Transparent pixels become the background the ink stands out from (a canvas drawing's strokes on nothing)."""
    if img.mode not in ("RGBA", "LA", "PA") and not (img.mode == "P" and "transparency" in img.info):
        return img
    rgba = img.convert("RGBA")
    alpha = np.asarray(rgba)[..., 3]
    gray = np.asarray(rgba.convert("L"), dtype=np.float32)
    opaque = alpha > 127
    if alpha.min() == 255:
        return rgba.convert("RGB")
    ink_is_dark = bool(opaque.any()) and float(gray[opaque].mean()) < 128
    background = (255, 255, 255) if ink_is_dark else (0, 0, 0)
    canvas = Image.new("RGB", rgba.size, background)
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    steps.append(f"transparency flattened onto {'white' if ink_is_dark else 'black'}")
    return canvas


def _dilate(a: np.ndarray, k: int) -> np.ndarray:
    """Grey-level dilation by a k x k square, separably: two passes of a 1-D running max, O(pixels x k)."""
    pad = k // 2
    for axis in (0, 1):
        padded = np.pad(a, [(pad, pad) if ax == axis else (0, 0) for ax in (0, 1)])
        a = np.lib.stride_tricks.sliding_window_view(padded, k, axis=axis).max(axis=-1)
    return np.ascontiguousarray(a, dtype=np.float32)


@functools.lru_cache(maxsize=512)
def _index_grids(shape: tuple[int, ...]) -> np.ndarray:
    """`np.indices(shape)`, made once per shape (a digit scaled to fit 20x20 has one of 400), read-only."""
    grids = np.indices(shape)
    grids.flags.writeable = False
    return grids


def _median_level(levels: np.ndarray) -> float:
    """`np.median` of uint8 values: by a sort when they are few (a small image's border), else from their histogram
    (a few calls instead of a sort of a large border); the same value either way."""
    n = levels.size
    if n <= 4096:
        ordered = np.sort(levels)
        return (int(ordered[(n - 1) // 2]) + int(ordered[n // 2])) / 2
    at_or_below = np.bincount(levels, minlength=256).cumsum()
    low, high = np.searchsorted(at_or_below, [(n - 1) // 2, n // 2], side="right")
    return (int(low) + int(high)) / 2


def _border(a: np.ndarray) -> np.ndarray:
    w = max(1, min(a.shape) // 20)
    return np.concatenate([a[:w].ravel(), a[-w:].ravel(), a[:, :w].ravel(), a[:, -w:].ravel()])


def _stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width: twice the ink area over its boundary length (exact for long straight strokes)."""
    area = int(mask.sum())
    if area == 0:
        return 0.0
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1]
    edge = inner & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return 2.0 * area / max(int(edge.sum()), 1)


def pixels_to_image(values: object) -> np.ndarray:
    """A 28x28 nested list of 0..255 ints or 0..1 floats -> (28, 28) uint8; DigitError otherwise.

    Values above 1 anywhere mean the 0..255 scale; otherwise 0..1 (so an all-0/1 array is binary 0..1).
    """
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        raise DigitError("pixels must be 28 rows of 28 numbers") from None
    if arr.shape != (MNIST_SIZE, MNIST_SIZE):
        raise DigitError(f"pixels must be 28 rows of 28 numbers, got shape {list(arr.shape)}")
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
        raise DigitError("pixels must be finite and within 0..255 (or 0..1)")
    scaled = arr if arr.max() > 1 else arr * 255
    return np.rint(scaled).astype(np.uint8)


# --- serving ---------------------------------------------------------------------------------------------------

MODEL_NAMES = ("cnn", "mlp")


@dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray  # (10,) float32, sums to 1
    preprocessed: Preprocessed

    @property
    def label(self) -> int:
        return int(self.probabilities.argmax())

    def top_k(self, k: int) -> list[tuple[int, float]]:
        order = np.argsort(-self.probabilities, kind="stable")[:k]
        return [(int(i), float(self.probabilities[i])) for i in order]


class Classifier:
    """One trained net with its model card (and its ONNX graph, where the card lists one); a copy per device, made
    on first use."""

    def __init__(self, name: str, model: nn.Module, card: dict[str, Any], onnx: bytes | None = None) -> None:
        self.name = name
        self.card = card
        self.onnx = onnx
        self._models: dict[torch.device, nn.Module] = {torch.device("cpu"): model.eval()}
        self._serving: dict[torch.device, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._lock = threading.Lock()

    def on(self, device: torch.device) -> nn.Module:
        model = self._models.get(device)
        if model is None:
            with self._lock:
                model = self._models.get(device)
                if model is None:
                    model = copy.deepcopy(self._models[torch.device("cpu")]).to(device).eval()
                    self._models[device] = model
        return model

    def serving(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """The net as predictions run it on `device`: on the CPU, its ONNX graph in ONNX Runtime (`OnnxNet`),
        with the module's labels and its logits within float32 rounding; otherwise, or without a graph, the module.
        """
        net = self._serving.get(device)
        if net is None:
            module = self.on(device)  # before taking the lock: `on` takes it too
            with self._lock:
                net = self._serving.get(device)
                if net is None:
                    net = OnnxNet(self.onnx, module) if device.type == "cpu" and self.onnx else module
                    self._serving[device] = net
        return net

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """`(N, 1, 28, 28)` in [0, 1] on the device to use -> `(N, 10)` softmax probabilities."""
        return torch.softmax(self.serving(batch.device)(batch), dim=1)

    def probabilities_of(self, pixels: np.ndarray, device: torch.device) -> np.ndarray:
        """`(N, 1, 28, 28)` float32 in [0, 1] on the host -> `(N, 10)` float32 softmax probabilities, computed on
        `device`: how /v1/predict and /v2's inference compute them, so the two agree to the bit. On the CPU, numpy in
        and out, no torch call on the busiest path (see `OnnxNet.logits`)."""
        net = self.serving(device)
        if isinstance(net, OnnxNet):
            return softmax(net.logits(pixels))
        with torch.inference_mode():
            return self.probabilities(torch.from_numpy(pixels).to(device)).cpu().numpy()

    def predict(self, digits: Sequence[Preprocessed], device: torch.device) -> list[Prediction]:
        # A lone digit's pixels go as a view, not stacked into a copy: 4 against 32 µs with the caches as an idle
        # server's (0.2 against 2.8 warm), on the busiest request.
        pixels = digits[0].pixels[None, None] if len(digits) == 1 else np.stack([d.pixels for d in digits])[:, None]
        probs = self.probabilities_of(pixels, device)
        return [Prediction(p, d) for p, d in zip(probs, digits, strict=True)]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Each row's softmax, in `torch.softmax`'s steps (the row's maximum subtracted, exp, divided by the sum), so
    within float32 rounding of it, not always to the bit: which is why every route computes its probabilities
    through `Classifier.probabilities_of`."""
    e: np.ndarray = np.exp(logits - logits.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


class OnnxNet:
    """The net's ONNX graph in ONNX Runtime, on the CPU: `logits` takes and gives numpy arrays; called with a float32
    batch it answers as the module would (torch's module itself for any other dtype, or one that needs gradients).

    One call runs the whole net, its kernels chosen and its buffers planned once, where torch makes a dozen calls
    through its dispatcher, each slower once a server's other work has left the caches cold: with the caches cleared
    between calls, a lone digit took 0.28-0.34 against 0.78-0.92 ms for the oneDNN path this replaced, 16 digits
    1.4-1.7 against 1.8-2.4 ms, 64 about as long either way; over HTTP a lone client's p50 fell from 1.54 to 1.23 ms
    and 16 clients got 2,331 against 2,036 req/s (8 alternated rounds). Its threads are torch's on the thread that
    makes it (a compute thread's share of the cores), and they sleep when idle, as torch's do, rather than spin."""

    def __init__(self, graph: bytes, module: nn.Module) -> None:
        import onnxruntime  # here, not at import: the nets' other users (training, the feature maps) do not need it

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: its warnings would go to stderr, outside our logs
        self.module = module
        self._session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        [self._input] = [i.name for i in self._session.get_inputs()]

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """`(N, 1, 28, 28)` float32 -> `(N, 10)` float32 logits. Predictions come this way, torch left out: a lone
        digit's prediction (softmax included) took 285 against 354 µs through torch tensors with the caches cleared
        between calls, 107 against 119 µs warm (medians of 3,000 interleaved calls)."""
        [out] = self._session.run(None, {self._input: np.ascontiguousarray(pixels, dtype=np.float32)})
        return cast(np.ndarray, out)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:  # (N, 1, 28, 28) -> (N, 10) logits
        if batch.dtype != torch.float32 or batch.requires_grad:
            logits: torch.Tensor = self.module(batch)
            return logits
        return torch.from_numpy(self.logits(batch.numpy()))


def load_classifier(name: str, directory: Path = MODELS_DIR, graph: bool = True) -> Classifier:
    """Weights (safetensors: no code runs on load), card, and the ONNX graph the card lists (unless `graph` is
    False); the card's SHA-256s must match the files."""
    if name not in MODEL_NAMES:  # names never reach the filesystem unchecked
        raise UnknownModelError(f"unknown model {name!r}; models: {', '.join(MODEL_NAMES)}")
    weights = directory / f"mnist-{name}.safetensors"
    card = json.loads((directory / f"mnist-{name}.json").read_text())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != card["weights"]["sha256"]:
        raise RuntimeError(f"{weights}: SHA-256 {digest} does not match its model card")
    with safe_open(str(weights), framework="pt") as f:
        config = json.loads((f.metadata() or {})["config"])
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    model = nets.NETS[name](nets.NetConfig(**config))
    model.load_state_dict(load_file(str(weights)), strict=True)
    card["layers"] = layer_table(model)
    onnx = None
    if graph and "onnx" in card:  # a card without one (trained before graphs were exported): the module serves
        path = directory / f"mnist-{name}.onnx"
        onnx = path.read_bytes()
        if hashlib.sha256(onnx).hexdigest() != card["onnx"]["sha256"]:
            raise RuntimeError(f"{path}: SHA-256 does not match its model card")
    return Classifier(name, model, card, onnx)


class Registry:
    """The served models, loaded once (at start-up, off the event loop); empty until then."""

    def __init__(self) -> None:
        self._classifiers: dict[str, Classifier] = {}
        self._loaded = threading.Event()

    def load(self, directory: Path = MODELS_DIR) -> None:
        self._classifiers = {name: load_classifier(name, directory) for name in MODEL_NAMES}
        self._loaded.set()

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    def names(self) -> list[str]:
        return list(self._classifiers)

    def get(self, name: str, loc: Loc | None = None) -> Classifier:
        """The model called `name`; `loc` is the request field that named it (None for a path)."""
        if not self._loaded.is_set():
            raise ModelsLoadingError("the models are still loading; retry in a moment")
        try:
            return self._classifiers[name]
        except KeyError:
            models = ", ".join(self._classifiers)
            shown = name if len(name) <= 40 else f"{name[:40]}..."  # a name is echoed, not a client's essay
            raise UnknownModelError(f"unknown model {shown!r}; models: {models}", loc) from None


# --- the trained CNN seen from inside ---------------------------------------------------------------------------


def cnn_featuremaps(
    classifier: Classifier, digit: Preprocessed, device: torch.device, stages: Sequence[int] | None
) -> tuple[PipelineResult, Prediction]:
    """Every conv, ReLU and pool activation of the CNN's `features` for one digit, and its prediction."""
    model = classifier.on(device)
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise NoFeatureMapsError(f"model {classifier.name!r} has no convolutional layers to show; use 'cnn'")
    x = torch.from_numpy(digit.pixels)[None, None].to(device)
    layers = list(features)
    if stages is not None:
        check_stage_indices(stages, len(layers))
    with torch.inference_mode():
        h = nets.normalize(x)
        outputs: list[torch.Tensor] = []
        for layer in layers:
            h = layer(h)
            outputs.append(h[0])
    [probs] = classifier.probabilities_of(digit.pixels[None, None], device)  # /v1/predict's answer, to the bit
    plans = []
    conv_count = 0
    names: list[str] = []
    for i, (layer, out) in enumerate(zip(layers, outputs, strict=True)):
        op = {nn.Conv2d: "conv", nn.ReLU: "relu", nn.MaxPool2d: "pool"}.get(type(layer), type(layer).__name__.lower())
        if op == "conv":
            conv_count += 1
            names = [f"conv{conv_count}[{c}]" for c in range(out.shape[0])]
        shape = (int(out.shape[0]), int(out.shape[1]), int(out.shape[2]))
        plans.append(StagePlan(i, op, shape, tuple(names)))
    first = layers[0]
    assert isinstance(first, nn.Conv2d)
    kernels = first.weight.detach().cpu().numpy()  # (16, 1, 5, 5): one input channel, so 2-D kernels
    filters = tuple(Filter(f"conv1[{c}]", kernels[c, 0]) for c in range(kernels.shape[0]))
    wanted = range(len(plans)) if stages is None else stages
    kept = tuple(StageResult.of(plans[i], outputs[i]) for i in wanted)  # extremes only of the stages asked for
    result = PipelineResult(device, (1, MNIST_SIZE, MNIST_SIZE), kept, {0: filters})
    return result, Prediction(probs, digit)


def prepare_digit(value: bytes | Sequence[Sequence[float]], preprocess: str, max_pixels: int, loc: Loc) -> Preprocessed:
    """An encoded image or 28x28 pixel values -> the model's input; errors name `loc` (e.g. `images[3]`)."""
    try:
        if isinstance(value, bytes):
            img = imaging.decode_image(value, max_pixels)
        else:
            img = Image.fromarray(pixels_to_image(value), "L")
        return preprocess_mnist(img) if preprocess == "mnist" else preprocess_none(img)
    except FeatureMapError as e:
        e.loc = e.loc or loc
        raise
