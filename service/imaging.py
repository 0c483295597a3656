"""Images in and out: decode uploads to tensors, scale maps to 8-bit levels, encode PNGs, colormaps, montages.

Decoding never trusts the file: the declared size is checked against the pixel limit before any pixel is
decoded, and every decoder failure becomes an `ImageDecodeError`.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from service.colormaps import LUTS
from service.cpus import unpin_thread, usable_cpus
from service.devices import to_host
from service.errors import ImageDecodeError, LimitExceededError, UnsupportedMediaError

ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
Scale = Literal["per_map", "per_stage", "none"]

# Our own pixel limit (checked from the header, before decoding) replaces Pillow's global one, whose
# warning would otherwise fire from the decoder for large but allowed images.
Image.MAX_IMAGE_PIXELS = None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The chunks Pillow reads from a PNG without inflating anything but the image data, which the IHDR bounds: no
# compressed text (zTXt, iTXt) or ICC profile (iCCP), each up to 1 MB inflated, no APNG frames.
_PLAIN_PNG_CHUNKS = frozenset(
    {b"IHDR", b"PLTE", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"tEXt", b"IDAT", b"IEND"}
)
_PLAIN_PNG_MAX_CHUNKS = 32  # and not many of them: Pillow spends about 2.6 µs on each, even an empty one


def plain_png_size(data: bytes) -> tuple[int, int] | None:
    """The width and height of a PNG whose decoding costs what they say: one IHDR, first (as the PNG specification
    puts it; Pillow obeys a second one, which may declare any size), and at most `_PLAIN_PNG_MAX_CHUNKS` chunks, all
    `_PLAIN_PNG_CHUNKS`. Read from the chunks' headers, with no decoding; None for anything else."""
    if data[:8] != _PNG_SIGNATURE or len(data) < 24:
        return None
    pos, end = 8, len(data)
    for _ in range(_PLAIN_PNG_MAX_CHUNKS):
        if pos + 8 > end:  # the end of the file (cut short or not: decoding will tell)
            break
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind not in _PLAIN_PNG_CHUNKS or (kind == b"IHDR") != (pos == 8):
            return None
        if kind == b"IEND":
            break
        pos += 12 + length  # length, type, data, CRC
    else:
        return None
    width, height = struct.unpack_from(">II", data, 16)
    return width, height


# 8-bit PNG colour types and the mode Pillow decodes each to, with the same raw mode: gray, RGB, gray + alpha, RGBA.
_PNG_8BIT_MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}
# Chunks that change nothing of a decoded image but its `info` (gamma, chromaticities, rendering intent, density),
# each with the one length the PNG specification gives it (Pillow refuses some other lengths).
_PNG_INERT_CHUNKS = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9}


def _decode_simple_png(data: bytes, max_pixels: int) -> Image.Image | None:
    """A simple PNG, decoded by the zlib decoder `Image.open` would use, in one call: 8 bits a channel, gray, RGB,
    gray + alpha or RGBA, not interlaced, within `max_pixels`; an IHDR, at most a few inert chunks, one run of IDAT
    and the IEND that ends the file, every CRC right. Same pixels and mode as `Image.open`, without its reading of
    the file in Python (its chunk reader, plugin and EXIF lookup; none of these chunks can hold EXIF): a 28x28 digit
    took 83 against 148-177 µs with the caches as an idle server's (a 1 ms sleep before each call), 19 against 58-71
    warm. None for any other file, or any doubt (bad pixel data included): `Image.open` reads those, and refuses or
    accepts them its own way."""
    if data[8:16] != b"\x00\x00\x00\x0dIHDR" or data[:8] != _PNG_SIGNATURE or len(data) < 33:
        return None
    width, height, depth, color, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    mode = _PNG_8BIT_MODES.get(color)
    if mode is None or depth != 8 or compression or filtering or interlace or not 0 < width * height <= max_pixels:
        return None
    view, pos, end = memoryview(data), 8, len(data)
    idat: list[memoryview] = []  # one run of image data: after it, only more of it, then IEND
    for _ in range(_PLAIN_PNG_MAX_CHUNKS):
        if pos + 12 > end:
            return None
        length, kind = struct.unpack_from(">I4s", data, pos)
        stop = pos + 12 + length
        if stop > end or zlib.crc32(view[pos + 4 : stop - 4]) != int.from_bytes(view[stop - 4 : stop], "big"):
            return None
        if kind == b"IEND":
            break
        if kind == b"IDAT":
            idat.append(view[pos + 8 : stop - 4])
        elif pos != 8 and (idat or _PNG_INERT_CHUNKS.get(kind) != length):  # not the IHDR, nor inert before the data
            return None
        pos = stop
    else:
        return None
    if stop != end or not idat:
        return None
    try:
        return Image.frombytes(mode, (width, height), b"".join(idat), "zip", mode)
    except (ValueError, OSError):  # the decoder found the data corrupt
        return None


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes of a PNG, JPEG, BMP, GIF (first frame), WebP or TIFF -> a loaded, upright Pillow image."""
    if not data:
        raise ImageDecodeError("the image is empty (0 bytes)")
    if (simple := _decode_simple_png(data, max_pixels)) is not None:
        return simple
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedMediaError(
            "the upload is not an image in a supported format; send PNG, JPEG, BMP, GIF, WebP or TIFF"
        ) from None
    except Exception as e:  # any decoder failure on client bytes is the client's malformed file
        raise ImageDecodeError(f"the image is corrupt or truncated: {e}") from None
    width, height = img.size
    fmt = img.format or "image"
    if width < 1 or height < 1:
        raise ImageDecodeError(f"the {fmt} image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise LimitExceededError(
            f"the {fmt} image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}"
        )
    try:
        img.load()
        if fmt == "WEBP":  # its file object keeps the decoder and its canvas (2x the pixels): a copy lets them go
            return ImageOps.exif_transpose(img)
        ImageOps.exif_transpose(img, in_place=True)  # the others drop their decoder on load: no copy needed
    except Exception as e:
        raise ImageDecodeError(f"the {fmt} image is corrupt or truncated: {e}") from None
    return img


def image_to_tensor(
    img: Image.Image, color: Literal["gray", "rgb"], normalize: Literal["unit", "none"]
) -> torch.Tensor:
    """A decoded image -> `(C, H, W)` float32: gray is ITU-R 601-2 luma (Pillow's `L`), rgb is R, G, B.

    Values are 0..255, divided by 255 when `normalize` is "unit" (as the tutorial's `/255` and ToTensor do).
    """
    arr = to_8bit_array(img, "L" if color == "gray" else "RGB")
    t = torch.from_numpy(arr)
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)  # (C, H, W)
    t = t.to(torch.float32)
    return t / 255 if normalize == "unit" else t


def to_8bit_array(img: Image.Image, mode: Literal["L", "RGB"]) -> np.ndarray:
    """Any decoded image -> `(H, W)` (L) or `(H, W, 3)` (RGB) uint8, a writable copy; 16-bit scaled, not clipped."""
    img = _to_8bit(img)
    try:
        return np.array(img if img.mode == mode else img.convert(mode))  # np.array copies: never Pillow's memory
    except (ValueError, OSError) as e:
        raise UnsupportedMediaError(f"images in mode {img.mode} cannot be converted to {mode}: {e}") from None


def _to_8bit(img: Image.Image) -> Image.Image:
    """Pillow's own conversion clips 16-bit and float pixels; scale them to 0..255 instead."""
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.float64)
        full = 65535.0 if img.mode.startswith("I;16") or wide.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(np.rint(wide * (255.0 / full)), 0, 255).astype(np.uint8))
    if img.mode == "F":
        flt = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(flt), 0, 255).astype(np.uint8))
    return img


@dataclass(frozen=True)
class Levels:
    """Maps as 8-bit levels plus, per map, the values that level 0 and level 256 stand for."""

    levels: np.ndarray  # (C, H, W) uint8
    lo: list[float]
    hi: list[float]


def to_levels(
    maps: torch.Tensor, scale: Scale, value_range: float, extremes: tuple[float, float] | None = None
) -> Levels:
    """`(C, H, W)` float32 -> 8-bit levels, computed on the maps' device so only bytes cross to the host.

    Level = floor((v - lo) / (hi - lo) * 256) clipped to 0..255: matplotlib's `imshow` rule, so gray PNGs
    match the tutorial's figures pixel for pixel. A value is recovered as lo + (level + 0.5) / 256 * (hi - lo).
    `per_map` takes lo/hi from each map, `per_stage` from the whole stage (its `extremes`, when the caller has them
    already: two passes over the maps fewer), `none` uses 0..value_range. A constant map (hi == lo) is all zeros.
    """
    c = maps.shape[0]
    if scale == "per_map":
        flat = maps.reshape(c, -1)
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    elif scale == "per_stage":
        low, high = extremes if extremes is not None else torch.stack(torch.aminmax(maps)).tolist()
        lo = torch.full((c,), low, dtype=maps.dtype, device=maps.device)
        hi = torch.full((c,), high, dtype=maps.dtype, device=maps.device)
    else:
        lo = torch.zeros(c, dtype=maps.dtype, device=maps.device)
        hi = torch.full((c,), value_range, dtype=maps.dtype, device=maps.device)
    span = (hi - lo)[:, None, None]
    safe = torch.where(span > 0, span, torch.ones_like(span))
    # The same operations on the same float32 values as `where(span > 0, (maps - lo) / safe, 0) * 256`, in one
    # copy of the maps and in place after it: where the span is 0 the map is constant and, if finite, v - lo is 0.
    x = maps - lo[:, None, None]
    x.div_(safe).mul_(256)
    if not bool(torch.isfinite(span).all()):  # a map holding inf or NaN: the where, as before
        x = torch.where(span > 0, x, torch.zeros_like(x))
    levels = x.floor_().clamp_(0, 255).to(torch.uint8)  # a quarter of float32's bytes cross to the host
    lo_hi = torch.stack([lo, hi]).cpu().tolist()  # one small copy, not two
    return Levels(to_host(levels), lo_hi[0], lo_hi[1])


def colorize(levels: np.ndarray, colormap: str) -> np.ndarray:
    """`(H, W)` uint8 levels -> `(H, W)` gray or `(H, W, 3)` RGB uint8."""
    return levels if colormap == "gray" else LUTS[colormap][levels]


_ENCODERS: ThreadPoolExecutor | None = None
_PARALLEL_FROM_PIXELS = 256 * 1024  # below this, a thread hop costs more than it saves


def encode_pngs(images: Sequence[np.ndarray]) -> list[bytes]:
    """Many maps -> PNGs, in order; in parallel threads when large (zlib releases the GIL while it works)."""
    global _ENCODERS
    if len(images) < 2 or sum(img.size for img in images) < _PARALLEL_FROM_PIXELS:
        return [encode_png(img) for img in images]
    if _ENCODERS is None:
        # Started from a compute thread, they would share its CPU in a pinned worker: they may use them all.
        _ENCODERS = ThreadPoolExecutor(usable_cpus(), thread_name_prefix="png", initializer=unpin_thread)
    return list(_ENCODERS.map(encode_png, images))


# zlib's fastest level, with the strategy zlib's manual gives for PNG image data (Pillow's `compress_type`): run
# lengths only. The dog's 12 default maps took 23 against 26 ms and 321 against 378 KB (smaller than level 6's 325
# KB), its viridis ones 78 against 85 ms and 755 against 846 KB, and a 1024x1024 map of a conv of noise 35 against 50
# ms, no larger. The pixels are the same either way: PNG is lossless.
PNG_OPTIONS: dict[str, int] = {"compress_level": 1, "compress_type": zlib.Z_RLE}


def encode_png(pixels: np.ndarray) -> bytes:
    """`(H, W)` or `(H, W, 3)` uint8 -> PNG bytes (fast settings: maps are sent once)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", **PNG_OPTIONS)
    return buf.getvalue()


@dataclass(frozen=True)
class MontageRow:
    title: str
    maps: Sequence[tuple[str, np.ndarray]]  # (caption, (H, W) or (H, W, 3) uint8)


_COLUMNS = 8
_PAD = 8
_CAPTION = 18
_TITLE = 26
MAX_MONTAGE_MAPS = 512


def montage(rows: Sequence[MontageRow], max_maps: int = MAX_MONTAGE_MAPS) -> bytes:
    """A labelled grid, one block per stage: the picture the tutorial draws with `imshow(cmap='gray')`."""
    count = sum(len(r.maps) for r in rows)
    if count > max_maps:
        raise LimitExceededError(
            f"a montage shows at most {max_maps} maps and this one has {count}; ask for fewer stages or for JSON"
        )
    largest = max((max(m.shape[:2]) for r in rows for _, m in r.maps), default=1)
    cell = min(320, max(160, largest))
    cols = min(_COLUMNS, max((len(r.maps) for r in rows), default=1))
    width = _PAD + cols * (cell + _PAD)
    heights = [_TITLE + math.ceil(len(r.maps) / cols) * (cell + _CAPTION + _PAD) for r in rows]
    canvas = Image.new("RGB", (width, _PAD + sum(heights)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    y = _PAD
    for row, height in zip(rows, heights, strict=True):
        draw.text((_PAD, y + 4), row.title, fill="black", font=font)
        for k, (caption, pixels) in enumerate(row.maps):
            r, c = divmod(k, cols)
            x0 = _PAD + c * (cell + _PAD)
            y0 = y + _TITLE + r * (cell + _CAPTION + _PAD)
            tile = _fit(Image.fromarray(pixels).convert("RGB"), cell)
            canvas.paste(tile, (x0 + (cell - tile.width) // 2, y0 + (cell - tile.height) // 2))
            draw.text((x0, y0 + cell + 2), caption, fill="black", font=font)
        y += height
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", **PNG_OPTIONS)
    return buf.getvalue()


def _fit(tile: Image.Image, cell: int) -> Image.Image:
    """Scale to fit `cell`: whole-number nearest-neighbour enlargement keeps pixels crisp; shrinking averages."""
    side = max(tile.width, tile.height)
    if side <= cell:
        k = cell // side
        return tile.resize((tile.width * k, tile.height * k), Image.Resampling.NEAREST) if k > 1 else tile
    ratio = cell / side
    size = (max(1, round(tile.width * ratio)), max(1, round(tile.height * ratio)))
    return tile.resize(size, Image.Resampling.BOX)
