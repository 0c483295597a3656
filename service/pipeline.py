"""The conv/activation/pool core: a pipeline spec as plain dataclasses, its shape plan, and its run in torch.

No HTTP here. Every spec problem is a `PipelineSpecError` whose `loc` points at the offending field, and every
limit is checked from the plan (shapes are known from the spec) before any tensor work starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from service.deadline import Deadline
from service.deadline import check as check_deadline
from service.errors import FieldIssue, LimitExceededError, Loc, PipelineSpecError
from service.filters import BANKS, PRESETS

Color = Literal["gray", "rgb"]
Normalize = Literal["unit", "none"]
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
ActivationOp = Literal["relu", "leaky_relu", "sigmoid", "tanh", "abs"]
PoolMode = Literal["max", "avg"]

ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "sigmoid", "tanh", "abs")
PADDING_MODES: tuple[str, ...] = ("zeros", "reflect", "replicate", "circular")
_TORCH_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}
INPUT_CHANNELS: dict[str, tuple[str, ...]] = {"gray": ("gray",), "rgb": ("R", "G", "B")}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Filter:
    """A named kernel: `(kH, kW)` filters each input channel on its own, `(C, kH, kW)` sums over channels."""

    name: str
    kernel: np.ndarray  # float32, (kH, kW) or (C, kH, kW)

    @property
    def depthwise(self) -> bool:
        return self.kernel.ndim == 2

    @property
    def size(self) -> tuple[int, int]:
        return int(self.kernel.shape[-2]), int(self.kernel.shape[-1])


@dataclass(frozen=True)
class Conv:
    filters: tuple[Filter, ...]
    stride: int = 1
    padding: Literal["valid", "same"] | int = "valid"
    padding_mode: PaddingMode = "zeros"
    bias: tuple[float, ...] | None = None  # one per filter, added to each of its output channels
    op: ClassVar[str] = "conv"


@dataclass(frozen=True)
class Activation:
    kind: ActivationOp = "relu"
    negative_slope: float = 0.01  # leaky_relu only

    @property
    def op(self) -> str:
        return self.kind


@dataclass(frozen=True)
class Pool:
    mode: PoolMode = "max"
    size: int = 2
    stride: int | None = None  # defaults to size
    op: ClassVar[str] = "pool"


Layer = Conv | Activation | Pool


def bank(name: str) -> tuple[Filter, ...]:
    """The filters of a preset bank, in bank order."""
    return tuple(Filter(n, PRESETS[n].kernel) for n in BANKS[name].filters)


DEFAULT_LAYERS: tuple[Layer, ...] = (Conv(bank("seed4")), Activation("relu"), Pool("max", 2))


@dataclass(frozen=True)
class PipelineSpec:
    """What to run: the input's colour handling and the stages. Defaults reproduce the tutorial's notebook."""

    color: Color = "gray"
    normalize: Normalize = "unit"
    layers: tuple[Layer, ...] = DEFAULT_LAYERS


@dataclass(frozen=True)
class Limits:
    max_layers: int = 16
    max_filters_per_conv: int = 64
    max_kernel_size: int = 31
    max_output_elements: int = 50_000_000
    max_macs: int = 20_000_000_000


@dataclass(frozen=True)
class StagePlan:
    """One stage's output as known before running: shape `(C, H, W)` and one label per channel."""

    index: int
    op: str
    shape: tuple[int, int, int]
    channels: tuple[str, ...]
    macs: int = 0


@dataclass(frozen=True)
class StageResult:
    plan: StagePlan
    maps: torch.Tensor  # (C, H, W) float32, on the device it ran on
    lo: float  # the maps' smallest value
    hi: float  # and largest: NaN if any is NaN

    @classmethod
    def of(cls, plan: StagePlan, maps: torch.Tensor) -> StageResult:
        """The stage with its extremes, found in one pass over the maps (and one wait, on a GPU)."""
        lo, hi = torch.stack(torch.aminmax(maps)).tolist()
        return cls(plan, maps, lo, hi)


@dataclass(frozen=True)
class PipelineResult:
    device: torch.device
    input_shape: tuple[int, int, int]  # (C, H, W)
    stages: tuple[StageResult, ...]  # the requested stages, in order
    filters: dict[int, tuple[Filter, ...]] = field(default_factory=dict)  # conv stage index -> its filters


# --- building a spec from plain data ---------------------------------------------------------------------------


def parse_kernel(value: object, loc: Loc) -> np.ndarray:
    """A nested list of numbers -> float32 kernel `(kH, kW)` or `(C, kH, kW)`; precise errors otherwise."""

    def fail(msg: str) -> PipelineSpecError:
        return PipelineSpecError.at(loc, msg)

    def shape_of(v: object, depth: int, path: str) -> list[int]:
        if isinstance(v, bool) or not isinstance(v, (list, tuple)):
            if depth == 0:
                raise fail("must be a 2-D (kH x kW) or 3-D (C x kH x kW) array of numbers")
            return []
        if not v:
            raise fail(f"is empty at {path or 'the top level'}")
        first = shape_of(v[0], depth + 1, f"{path}[0]")
        for i, item in enumerate(v[1:], start=1):
            other = shape_of(item, depth + 1, f"{path}[{i}]")
            if other != first:
                raise fail(f"is ragged: {path}[{i}] has shape {other or 'scalar'}, {path}[0] has {first or 'scalar'}")
        return [len(v), *first]

    shape = shape_of(value, 0, "")
    if len(shape) not in (2, 3):
        raise fail(f"must be 2-D (kH x kW) or 3-D (C x kH x kW), got {len(shape)}-D")
    flat: list[object] = []

    def collect(v: object) -> None:
        if isinstance(v, (list, tuple)):
            for item in v:
                collect(item)
        else:
            flat.append(v)

    collect(value)
    for i, v in enumerate(flat):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise fail(f"has a non-numeric value {v!r} (element {i} in row-major order)")
        if isinstance(v, int) and abs(v) > _FLOAT32_MAX:  # before float(): ints may exceed any float
            raise fail("has a value too large for float32")
        if not math.isfinite(v):
            raise fail(f"has a non-finite value {v!r} (element {i} in row-major order)")
    kernel = np.asarray(flat, dtype=np.float64).reshape(shape)
    if np.abs(kernel).max(initial=0.0) > _FLOAT32_MAX:
        raise fail("has a value too large for float32")
    out = kernel.astype(np.float32)
    out.setflags(write=False)
    return out


def resolve_filters(refs: str | Sequence[str | tuple[str | None, object]], loc: Loc) -> tuple[Filter, ...]:
    """A bank name, or a list of preset names and `(name, kernel)` pairs -> filters in request order."""
    if isinstance(refs, str):
        if refs in BANKS:
            return bank(refs)
        if refs in PRESETS:
            return (Filter(refs, PRESETS[refs].kernel),)
        raise PipelineSpecError.at(loc, _unknown_preset_msg(refs))
    if not refs:
        raise PipelineSpecError.at(loc, "must name at least one filter")
    out: list[Filter] = []
    issues: list[FieldIssue] = []
    for i, ref in enumerate(refs):
        try:
            if isinstance(ref, str):
                if ref not in PRESETS:
                    raise PipelineSpecError.at((*loc, i), _unknown_preset_msg(ref))
                out.append(Filter(ref, PRESETS[ref].kernel))
            else:
                name, kernel = ref
                out.append(Filter(name or f"custom_{i + 1}", parse_kernel(kernel, (*loc, i, "kernel"))))
        except PipelineSpecError as e:
            issues.extend(e.issues)
    if issues:
        raise PipelineSpecError(issues)
    return tuple(out)


def _unknown_preset_msg(name: str) -> str:
    return f"unknown filter or bank {name!r}; banks: {', '.join(sorted(BANKS))}; filters: {', '.join(sorted(PRESETS))}"


# --- planning: shapes and limits before any work ---------------------------------------------------------------


def same_padding(kh: int, kw: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) for "same", anchored at the kernel centre as OpenCV's filter2D does."""
    return kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2


def _conv_padding(layer: Conv, kh: int, kw: int) -> tuple[int, int, int, int]:
    if layer.padding == "same":
        return same_padding(kh, kw)
    p = 0 if layer.padding == "valid" else int(layer.padding)
    return p, p, p, p


def plan(spec: PipelineSpec, height: int, width: int, limits: Limits) -> tuple[StagePlan, ...]:
    """Every stage's output shape for an input of `height x width`; raises on any spec or limit problem."""
    if not spec.layers:
        raise PipelineSpecError.at(("layers",), "must have at least one stage")
    if len(spec.layers) > limits.max_layers:
        raise LimitExceededError(
            f"the pipeline has {len(spec.layers)} stages; the limit is {limits.max_layers}", ("layers",)
        )
    labels = INPUT_CHANNELS[spec.color]
    c, h, w = len(labels), height, width
    plans: list[StagePlan] = []
    total = 0
    total_macs = 0
    for i, layer in enumerate(spec.layers):
        loc: Loc = ("layers", i)
        macs = 0
        if isinstance(layer, Conv):
            c, h, w, labels, macs = _plan_conv(layer, c, h, w, labels, loc, limits)
        elif isinstance(layer, Pool):
            if layer.size < 1:
                raise PipelineSpecError.at((*loc, "size"), "must be at least 1")
            stride = layer.size if layer.stride is None else layer.stride
            if stride < 1:
                raise PipelineSpecError.at((*loc, "stride"), "must be at least 1")
            if layer.size > h or layer.size > w:
                raise PipelineSpecError.at((*loc, "size"), f"pool size {layer.size} is larger than its {h}x{w} input")
            h, w = (h - layer.size) // stride + 1, (w - layer.size) // stride + 1
            macs = c * h * w * layer.size * layer.size
        elif layer.kind not in ACTIVATIONS:
            raise PipelineSpecError.at((*loc, "op"), f"unknown activation {layer.kind!r}")
        elements = c * h * w
        total += elements
        total_macs += macs
        if total > limits.max_output_elements:
            raise LimitExceededError(
                f"stage {i} ({layer.op}, {c}x{h}x{w}) brings the output to {total:,} elements; "
                f"the limit is {limits.max_output_elements:,}",
                loc,
            )
        if total_macs > limits.max_macs:
            raise LimitExceededError(
                f"stage {i} ({layer.op}) brings the work to {total_macs:,} multiply-adds; "
                f"the limit is {limits.max_macs:,}",
                loc,
            )
        plans.append(StagePlan(i, layer.op, (c, h, w), labels, macs))
    return tuple(plans)


def _plan_conv(
    layer: Conv, c: int, h: int, w: int, labels: tuple[str, ...], loc: Loc, limits: Limits
) -> tuple[int, int, int, tuple[str, ...], int]:
    n = len(layer.filters)
    if n == 0:
        raise PipelineSpecError.at((*loc, "filters"), "must name at least one filter")
    if n > limits.max_filters_per_conv:
        raise LimitExceededError(
            f"stage {loc[-1]} has {n} filters; the limit is {limits.max_filters_per_conv}", (*loc, "filters")
        )
    if layer.stride < 1:
        raise PipelineSpecError.at((*loc, "stride"), "must be at least 1")
    if not isinstance(layer.padding, str) and layer.padding < 0:
        raise PipelineSpecError.at((*loc, "padding"), "must be 'valid', 'same' or a non-negative integer")
    if layer.padding_mode not in PADDING_MODES:
        raise PipelineSpecError.at((*loc, "padding_mode"), f"must be one of {', '.join(PADDING_MODES)}")
    if layer.bias is not None and len(layer.bias) != n:
        raise PipelineSpecError.at((*loc, "bias"), f"has {len(layer.bias)} values for {n} filters")
    out_hw: tuple[int, int] | None = None
    out_labels: list[str] = []
    macs = 0
    for j, f in enumerate(layer.filters):
        floc: Loc = (*loc, "filters", j)
        kh, kw = f.size
        if max(kh, kw) > limits.max_kernel_size:
            raise LimitExceededError(
                f"filter {f.name!r} is {kh}x{kw}; the largest kernel side allowed is {limits.max_kernel_size}",
                floc,
            )
        if not f.depthwise and f.kernel.shape[0] != c:
            raise PipelineSpecError.at(
                (*floc, "kernel"),
                f"a 3-D kernel must have one slice per input channel: it has {f.kernel.shape[0]}, the input {c}",
            )
        left, right, top, bottom = _conv_padding(layer, kh, kw)
        if layer.padding_mode == "reflect" and (max(top, bottom) >= h or max(left, right) >= w):
            raise PipelineSpecError.at((*loc, "padding"), f"reflect padding must be smaller than the {h}x{w} input")
        if layer.padding_mode == "circular" and (max(top, bottom) > h or max(left, right) > w):
            raise PipelineSpecError.at((*loc, "padding"), f"circular padding must not exceed the {h}x{w} input")
        ph, pw = h + top + bottom, w + left + right
        if c * (ph * pw - h * w) > limits.max_output_elements:  # padding makes a copy of the input, bounded alike
            raise LimitExceededError(
                f"stage {loc[-1]}'s padding makes its {c}x{h}x{w} input {c}x{ph}x{pw}, {c * (ph * pw - h * w):,} "
                f"elements more; the limit is {limits.max_output_elements:,}",
                (*loc, "padding"),
            )
        if kh > ph or kw > pw:
            raise PipelineSpecError.at(
                (*floc, "kernel"), f"kernel {kh}x{kw} is larger than its {ph}x{pw} (padded) input"
            )
        hw = ((ph - kh) // layer.stride + 1, (pw - kw) // layer.stride + 1)
        if out_hw is None:
            out_hw = hw
        elif hw != out_hw:
            raise PipelineSpecError.at(
                (*loc, "filters"),
                f"kernels of one stage must give maps of one size: {f.name!r} gives {hw[0]}x{hw[1]}, "
                f"the first filter {out_hw[0]}x{out_hw[1]} (use padding 'same' to mix kernel sizes)",
            )
        if f.depthwise:
            out_labels.extend(f.name if lab == "gray" else f"{f.name}({lab})" for lab in labels)
            macs += c * hw[0] * hw[1] * kh * kw
        else:
            out_labels.append(f.name)
            macs += hw[0] * hw[1] * c * kh * kw
    assert out_hw is not None
    return len(out_labels), out_hw[0], out_hw[1], tuple(out_labels), macs


# --- running ---------------------------------------------------------------------------------------------------


def run_layer(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """One stage: `(C, H, W)` float32 -> `(C', H', W')` float32, on x's device."""
    if isinstance(layer, Conv):
        return _run_conv(layer, x)
    if isinstance(layer, Pool):
        stride = layer.size if layer.stride is None else layer.stride
        if layer.mode == "max" and stride == layer.size and layer.size in _SLICED_MAX_POOL and x.device.type == "cpu":
            return _max_pool_sliced(x, layer.size)
        pool = F.max_pool2d if layer.mode == "max" else F.avg_pool2d
        return pool(x.unsqueeze(0), layer.size, stride)[0]
    if layer.kind == "relu":
        return F.relu(x)
    if layer.kind == "leaky_relu":
        return F.leaky_relu(x, layer.negative_slope)
    if layer.kind == "sigmoid":
        return torch.sigmoid(x)
    if layer.kind == "tanh":
        return torch.tanh(x)
    return torch.abs(x)


_SLICED_MAX_POOL = (2, 3)  # the window sizes (stride = size) where `_max_pool_sliced` is the faster on the CPU


def _max_pool_sliced(x: torch.Tensor, k: int) -> torch.Tensor:
    """`F.max_pool2d(x, k, k)` for `(C, H, W)` on the CPU, as the elementwise maximum of the k x k strided slices
    that hold each window's first, second... element: the same values (a max is exact; NaN propagates; only the
    sign of a zero may differ, as it does between torch's own vectorised and scalar loops). ATen's CPU kernel walks
    each window on its own: on 16x1022x1022 maps and one thread, 2x2 windows took 31 against 115 ms, 3x3 36
    against 70 ms (4x4: 49 against 54; larger windows gain nothing)."""
    h, w = x.shape[1] // k, x.shape[2] // k  # a partial last window is dropped, as max_pool2d does
    out = x[:, 0 : h * k : k, 0 : w * k : k].clone()
    for dy in range(k):
        for dx in range(k):
            if dy or dx:
                torch.maximum(out, x[:, dy : dy + h * k : k, dx : dx + w * k : k], out=out)
    return out


def _run_conv(layer: Conv, x: torch.Tensor) -> torch.Tensor:
    c = x.shape[0]
    # Filters of one kind and size run as one conv; outputs go back into request order afterwards.
    groups: dict[tuple[bool, int, int], list[int]] = {}
    for j, f in enumerate(layer.filters):
        groups.setdefault((f.depthwise, *f.size), []).append(j)
    outputs: list[tuple[list[int], torch.Tensor]] = []
    for (depthwise, kh, kw), idx in groups.items():
        left, right, top, bottom = _conv_padding(layer, kh, kw)
        xp = x.unsqueeze(0)  # (1, C, H, W)
        if left or right or top or bottom:
            mode = _TORCH_PAD_MODE[layer.padding_mode]
            xp = F.pad(xp, (left, right, top, bottom), mode=mode)
        weight = torch.from_numpy(np.stack([layer.filters[j].kernel for j in idx])).to(x.device)
        if depthwise:
            # Each channel is its own image: (C, 1, H, W) * (F, 1, kH, kW) -> (C, F, H', W') -> (F, C, H', W').
            out = F.conv2d(xp.transpose(0, 1), weight.unsqueeze(1), stride=layer.stride).transpose(0, 1)
        else:
            out = F.conv2d(xp, weight, stride=layer.stride)[0].unsqueeze(1)  # (F, 1, H', W')
        outputs.append((idx, out))
    if len(outputs) == 1:  # one conv ran every filter, in request order: its output is the stage, not copied again
        maps = outputs[0][1].flatten(0, 1)  # filter-major: f0(c0..cn), f1(...)
    else:
        pieces = {j: out[k] for idx, out in outputs for k, j in enumerate(idx)}
        maps = torch.cat([pieces[j] for j in range(len(layer.filters))])  # filter-major: f0(c0..cn), f1(...)
    if layer.bias is not None:  # one value per map, laid out on the host: a GPU's repeat_interleave waits to size it
        counts = [c if f.depthwise else 1 for f in layer.filters]
        per_map = torch.from_numpy(np.repeat(np.asarray(layer.bias, np.float32), counts)).to(maps.device)
        maps = maps + per_map.to(maps.dtype)[:, None, None]
    return maps.contiguous()


def _commutes_with_max_pool(layer: Layer, following: Layer) -> bool:
    """ReLU (or a leaky one with a slope of 0 or more), then a max pool: the pool of the activation's maps is the
    activation of the pooled maps, value for value (the largest input gives the largest output, and both are exact
    in floating point: a clamp, a product with a constant), so the pool may run first and the activation on what it
    keeps. Not sigmoid or tanh: increasing too, but their vectorised approximations need not be, to the last bit."""
    return (
        isinstance(layer, Activation)
        and (layer.kind == "relu" or (layer.kind == "leaky_relu" and layer.negative_slope >= 0))
        and isinstance(following, Pool)
        and following.mode == "max"
    )


def check_stage_indices(stages: Sequence[int], count: int) -> None:
    """Each requested stage must exist and be asked for once (a repeat would multiply the response)."""
    seen: set[int] = set()
    for k, s in enumerate(stages):
        if not 0 <= s < count:
            raise PipelineSpecError.at(
                ("output", "stages", k), f"stage {s} does not exist; the pipeline has stages 0..{count - 1}"
            )
        if s in seen:
            raise PipelineSpecError.at(("output", "stages", k), f"stage {s} is asked for twice")
        seen.add(s)


def run_pipeline(
    image: torch.Tensor,
    spec: PipelineSpec,
    limits: Limits,
    stages: Sequence[int] | None = None,
    deadline: Deadline | None = None,
) -> PipelineResult:
    """Run `spec` on `image` `(C, H, W)` float32 (on the device to use); keep the `stages` asked for (all if None).

    Raises `PipelineSpecError`/`LimitExceededError` before any work when the spec cannot run within limits, and
    `ComputeTimeoutError` between stages once `deadline` has passed.
    """
    c, h, w = image.shape
    plans = plan(spec, h, w, limits)
    wanted = range(len(plans)) if stages is None else stages
    check_stage_indices(wanted, len(plans))
    keep = set(wanted)
    last = max(keep, default=-1)
    kept: dict[int, StageResult] = {}
    x = image
    pooled_first = -1  # a max pool already run, ahead of the activation before it (whose maps nobody asked for)
    for p, layer in zip(plans[: last + 1], spec.layers, strict=False):
        if p.index == pooled_first:
            continue
        following = spec.layers[p.index + 1] if p.index < last else None
        if p.index not in keep and following is not None and _commutes_with_max_pool(layer, following):
            x = run_layer(layer, run_layer(following, x))  # on the pooled values: a quarter for 2x2 windows
            pooled_first, p = p.index + 1, plans[p.index + 1]
        else:
            x = run_layer(layer, x)
        check_deadline(deadline, f"computing stage {p.index} ({p.op})")
        if p.index in keep:
            stage = StageResult.of(p, x)
            # NaN and inf show in the extremes: one reduction instead of a full boolean copy of the stage
            if not (math.isfinite(stage.lo) and math.isfinite(stage.hi)):
                raise PipelineSpecError.at(
                    ("layers", p.index), "values overflow float32 at this stage; use smaller kernel values or bias"
                )
            kept[p.index] = stage
    return PipelineResult(
        device=image.device,
        input_shape=(c, h, w),
        stages=tuple(kept[i] for i in wanted),
        filters={i: layer.filters for i, layer in enumerate(spec.layers) if isinstance(layer, Conv)},
    )
