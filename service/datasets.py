"""MNIST from the project's own copy of the original IDX files: SHA-256 verified, parsed with numpy."""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MNIST_DIR = Path(__file__).resolve().parent.parent / "data" / "mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetError(Exception):
    """A data file is missing, corrupt (its SHA-256 differs) or not IDX."""


@dataclass(frozen=True)
class Digits:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) uint8


def _sums(directory: Path) -> dict[str, str]:
    lines = (directory / "SHA256SUMS").read_text().split("\n")
    return {name: digest for digest, name in (line.split() for line in lines if line.strip())}


def read_idx(path: Path, expected_sha256: str) -> np.ndarray:
    """A gzipped IDX file -> uint8 array of its declared shape, after checking the unzipped SHA-256."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read: {e}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected_sha256:
        raise DatasetError(f"{path}: SHA-256 {digest} does not match {expected_sha256}")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path}: not an IDX file of uint8")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: {data.size} bytes of data for shape {shape}")
    return data.reshape(shape)


def load_mnist(split: str, directory: Path = MNIST_DIR) -> Digits:
    """`split` is `train` (60,000 digits) or `test` (10,000)."""
    sums = _sums(directory)
    images_name, labels_name = _FILES[split]
    images = read_idx(directory / f"{images_name}.gz", sums[images_name])
    labels = read_idx(directory / f"{labels_name}.gz", sums[labels_name])
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise DatasetError(f"{split}: {images.shape} images for {labels.shape} labels")
    return Digits(images, labels)
