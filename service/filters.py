"""Preset filters and banks, in OpenCV's conventions (cross-correlation, x to the right, y down).

Kernels are float32 numpy arrays `(kH, kW)`; a bank is an ordered list of preset names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FloatArray = np.ndarray


@dataclass(frozen=True)
class Preset:
    name: str
    kernel: FloatArray  # (kH, kW) float32
    description: str


@dataclass(frozen=True)
class Bank:
    name: str
    filters: tuple[str, ...]
    description: str


def _k(rows: list[list[float]], scale: float = 1.0) -> FloatArray:
    kernel: FloatArray = (np.asarray(rows, dtype=np.float64) * scale).astype(np.float32)
    kernel.setflags(write=False)
    return kernel


_SEED = np.array([[-1, -1, 1, 1]] * 4, dtype=np.float64)  # the tutorial's filter_vals
_BINOMIAL_3 = np.array([1, 2, 1], dtype=np.float64)
_BINOMIAL_5 = np.array([1, 4, 6, 4, 1], dtype=np.float64)  # cv2.getGaussianKernel(5, 0) * 16

_PRESETS: tuple[Preset, ...] = (
    Preset("seed_1", _k(_SEED.tolist()), "Tutorial filter 1: dark left, bright right (vertical edges)."),
    Preset("seed_2", _k((-_SEED).tolist()), "Tutorial filter 2: the negative of seed_1."),
    Preset("seed_3", _k(_SEED.T.tolist()), "Tutorial filter 3: the transpose of seed_1 (horizontal edges)."),
    Preset("seed_4", _k((-_SEED.T).tolist()), "Tutorial filter 4: the negative of seed_3."),
    Preset(
        "sobel_x",
        _k([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]),
        "Sobel x-derivative (cv2.Sobel dx=1, dy=0, ksize=3): positive where brightness grows to the right.",
    ),
    Preset(
        "sobel_y",
        _k([[-1, -2, -1], [0, 0, 0], [1, 2, 1]]),
        "Sobel y-derivative (cv2.Sobel dx=0, dy=1, ksize=3): positive where brightness grows downwards.",
    ),
    Preset(
        "scharr_x",
        _k([[-3, 0, 3], [-10, 0, 10], [-3, 0, 3]]),
        "Scharr x-derivative (cv2.Scharr dx=1, dy=0): a more rotation-exact Sobel.",
    ),
    Preset(
        "scharr_y",
        _k([[-3, -10, -3], [0, 0, 0], [3, 10, 3]]),
        "Scharr y-derivative (cv2.Scharr dx=0, dy=1).",
    ),
    Preset(
        "prewitt_x",
        _k([[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]]),
        "Prewitt x-derivative: positive where brightness grows to the right.",
    ),
    Preset(
        "prewitt_y",
        _k([[-1, -1, -1], [0, 0, 0], [1, 1, 1]]),
        "Prewitt y-derivative: positive where brightness grows downwards.",
    ),
    Preset(
        "laplacian",
        _k([[0, 1, 0], [1, -4, 1], [0, 1, 0]]),
        "4-neighbour Laplacian (cv2.Laplacian ksize=1): responds to blobs and fine detail.",
    ),
    Preset("box_blur_3", _k(np.ones((3, 3)).tolist(), 1 / 9), "3x3 box blur: the mean of the neighbourhood."),
    Preset(
        "gaussian_3",
        _k(np.outer(_BINOMIAL_3, _BINOMIAL_3).tolist(), 1 / 16),
        "3x3 Gaussian blur: [1,2,1] x [1,2,1] / 16.",
    ),
    Preset(
        "gaussian_5",
        _k(np.outer(_BINOMIAL_5, _BINOMIAL_5).tolist(), 1 / 256),
        "5x5 Gaussian blur: [1,4,6,4,1] x [1,4,6,4,1] / 256 (cv2.getGaussianKernel(5, 0)).",
    ),
    Preset("sharpen", _k([[0, -1, 0], [-1, 5, -1], [0, -1, 0]]), "Sharpen: identity plus a negative Laplacian."),
    Preset("emboss", _k([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]), "Emboss: relief lit from the bottom right."),
    Preset("identity", _k([[0, 0, 0], [0, 1, 0], [0, 0, 0]]), "Identity: returns its input unchanged."),
)

_BANKS: tuple[Bank, ...] = (
    Bank("seed4", ("seed_1", "seed_2", "seed_3", "seed_4"), "The tutorial's four 4x4 edge filters."),
    Bank("sobel", ("sobel_x", "sobel_y"), "Sobel x and y derivatives."),
    Bank("scharr", ("scharr_x", "scharr_y"), "Scharr x and y derivatives."),
    Bank("prewitt", ("prewitt_x", "prewitt_y"), "Prewitt x and y derivatives."),
    Bank("blur", ("box_blur_3", "gaussian_3", "gaussian_5"), "Box and Gaussian blurs."),
)

PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}
BANKS: dict[str, Bank] = {b.name: b for b in _BANKS}
