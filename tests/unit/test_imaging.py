"""Decoding, gray conversion, 8-bit levels and colormaps against OpenCV and matplotlib; montages."""

from __future__ import annotations

import io
import zlib

import cv2
import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.colors import ListedColormap, Normalize
from PIL import Image, PngImagePlugin

from service import imaging
from service.colormaps import COLORMAPS, LUTS
from service.devices import to_host
from service.errors import ImageDecodeError, LimitExceededError, UnsupportedMediaError
from tests.conftest import DEVICES, DOG, encoded, png_chunk

RNG = np.random.default_rng(7)
BIG = 10**8


RGB = Image.fromarray(RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_decode_to_the_same_pixels(fmt: str) -> None:
    params = {"lossless": True} if fmt == "WEBP" else {}
    img = imaging.decode_image(encoded(RGB, fmt, **params), BIG)
    np.testing.assert_array_equal(np.asarray(img.convert("RGB")), np.asarray(RGB))


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP", "JPEG", "GIF"])
def test_a_decoded_image_holds_no_decoder(fmt: str) -> None:
    """What `decode_image` returns lives through the request: it must not keep the file's decoder, which for WebP
    holds a canvas of its own (2x the pixels), so WebP comes back as a plain copy; the others drop theirs on load."""
    img = imaging.decode_image(encoded(RGB, fmt), BIG)
    assert getattr(img, "_decoder", None) is None
    assert getattr(img, "fp", None) is None  # the file is read and let go


def test_jpeg_decodes_like_opencv() -> None:
    got = imaging.image_to_tensor(imaging.decode_image(DOG.read_bytes(), BIG), "rgb", "none")
    want = cv2.cvtColor(cv2.imread(str(DOG)), cv2.COLOR_BGR2RGB).transpose(2, 0, 1)
    np.testing.assert_array_equal(got.numpy(), want.astype(np.float32))


def test_gif_uses_the_first_frame() -> None:
    frames = [Image.new("L", (4, 4), v) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    x = imaging.image_to_tensor(imaging.decode_image(buf.getvalue(), BIG), "gray", "none")
    assert x.shape == (1, 4, 4) and float(x.max()) == 10.0


def test_gray_is_itu_601_luma_like_opencv_bgr2gray() -> None:
    arr = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    img = imaging.decode_image(encoded(Image.fromarray(arr, "RGB"), "PNG"), BIG)
    got = imaging.image_to_tensor(img, "gray", "none")[0].numpy()
    want = cv2.cvtColor(arr[..., ::-1].copy(), cv2.COLOR_BGR2GRAY).astype(np.float32)
    exact = 0.299 * arr[..., 0] + 0.587 * arr[..., 1] + 0.114 * arr[..., 2]
    assert np.abs(got - want).max() <= 1  # the two libraries round their fixed point differently
    assert np.abs(got - exact).max() <= 0.5 + 1e-6  # both are the ITU-R 601-2 luma, rounded


def test_normalize_unit_divides_by_255_like_the_tutorial() -> None:
    img = imaging.decode_image(DOG.read_bytes(), BIG)
    unit = imaging.image_to_tensor(img, "gray", "unit")
    raw = imaging.image_to_tensor(img, "gray", "none")
    assert unit.dtype == torch.float32 and raw.max() > 1
    assert torch.equal(unit, raw / 255)


@pytest.mark.parametrize(
    ("mode", "array", "want"),
    [
        ("I;16", np.array([[0, 65535], [257 * 100, 32768]], dtype=np.uint16), [[0, 255], [100, 128]]),
        ("L", np.array([[0, 255], [7, 8]], dtype=np.uint8), [[0, 255], [7, 8]]),
    ],
)
def test_16_bit_images_are_scaled_not_clipped(mode: str, array: np.ndarray, want: list[list[int]]) -> None:
    img = imaging.decode_image(encoded(Image.fromarray(array), "PNG"), BIG)
    assert img.mode == mode
    got = imaging.image_to_tensor(img, "gray", "none")[0].numpy()
    np.testing.assert_array_equal(got, np.array(want, dtype=np.float32))


def test_palette_and_cmyk_images_convert() -> None:
    for img in (RGB.convert("P"), RGB.convert("CMYK")):
        fmt = "TIFF" if img.mode == "CMYK" else "PNG"
        x = imaging.image_to_tensor(imaging.decode_image(encoded(img, fmt), BIG), "rgb", "unit")
        assert x.shape == (3, 12, 10)


def test_exif_orientation_is_applied() -> None:
    wide = Image.new("RGB", (8, 4), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    img = imaging.decode_image(encoded(wide, "JPEG", exif=exif.tobytes()), BIG)
    assert img.size == (4, 8)


@pytest.mark.parametrize(
    ("data", "error", "fragment"),
    [
        (b"", ImageDecodeError, "empty"),
        (b"hello, not an image", UnsupportedMediaError, "supported format"),
        (b"%PDF-1.4\n%...", UnsupportedMediaError, "supported format"),
        (encoded(RGB, "PNG")[:60], ImageDecodeError, "corrupt or truncated"),
        (encoded(RGB, "JPEG")[:200], ImageDecodeError, "corrupt or truncated"),
        (encoded(RGB, "JPEG")[:-200], ImageDecodeError, "corrupt or truncated"),
    ],
    ids=["empty", "text", "pdf", "truncated png", "truncated jpeg header", "truncated jpeg data"],
)
def test_bad_files_raise_decode_errors(data: bytes, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        imaging.decode_image(data, BIG)


def test_pixel_limit_is_checked_before_decoding() -> None:
    # A PNG that declares 20000 x 20000 pixels in a few dozen bytes: a bomb for an unchecked decoder.
    ihdr = (20000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    idat, iend = png_chunk(b"IDAT", zlib.compress(b"")), png_chunk(b"IEND", b"")
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + idat + iend
    with pytest.raises(LimitExceededError, match="400,000,000 pixels"):
        imaging.decode_image(bomb, 16_000_000)


def _with_chunk(png: bytes, chunk: bytes, after_ihdr: bool = True) -> bytes:
    """`png` with `chunk` inserted right after its IHDR (8 + 25 bytes in), or just before its IEND."""
    at = 33 if after_ihdr else len(png) - 12
    return png[:at] + chunk + png[at:]


def _text_png(**params: object) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * 100, **params)  # type: ignore[arg-type]
    return encoded(Image.new("L", (28, 28)), "PNG", pnginfo=info)


GRAY_28 = encoded(Image.new("L", (28, 28)), "PNG")


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (GRAY_28, (28, 28)),
        (encoded(Image.new("RGBA", (64, 3)), "PNG"), (64, 3)),
        (encoded(RGB, "PNG"), (10, 12)),
        (encoded(Image.new("I;16", (300, 1)), "PNG"), (300, 1)),
        (encoded(Image.new("P", (5, 7)), "PNG", transparency=0), (5, 7)),  # PLTE and tRNS
        (_text_png(), (28, 28)),  # tEXt: as many bytes as the file has
        (_with_chunk(GRAY_28, png_chunk(b"gAMA", (45455).to_bytes(4, "big"))), (28, 28)),
        (_with_chunk(GRAY_28, png_chunk(b"tEXt", b"") * 29), (28, 28)),  # 32 chunks in all
    ],
    ids=["28x28 gray", "64x3 rgba", "10x12 rgb", "300x1 16-bit", "palette", "tEXt", "gAMA", "32 chunks"],
)
def test_plain_png_size_reads_the_size_pillow_reads(data: bytes, size: tuple[int, int]) -> None:
    assert imaging.plain_png_size(data) == Image.open(io.BytesIO(data)).size == size


IHDR_4000 = (4000).to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # 16 M pixels, 1 bit each


@pytest.mark.parametrize(
    "data",
    [
        b"",
        GRAY_28[:23],  # cut within the IHDR's size
        encoded(RGB, "JPEG"),
        encoded(RGB, "BMP"),
        GRAY_28[:12] + b"tEXt" + GRAY_28[16:],  # IHDR not first
        b"\x88" + GRAY_28[1:],  # a signature off by one bit
        _with_chunk(GRAY_28, png_chunk(b"IHDR", IHDR_4000)),  # a second IHDR, which Pillow obeys
        _text_png(zip=True),  # zTXt
        _with_chunk(GRAY_28, png_chunk(b"iTXt", b"comment\x00\x01\x00\x00\x00" + zlib.compress(b"a" * 100))),
        _with_chunk(GRAY_28, png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(b"a" * 100))),
        _with_chunk(GRAY_28, png_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"a" * 100)), after_ihdr=False),
        encoded(Image.new("L", (28, 28)), "PNG", save_all=True, append_images=[Image.new("L", (28, 28), 255)]),
        _with_chunk(GRAY_28, png_chunk(b"tEXt", b"") * 30),  # 33 chunks
    ],
    ids=[
        "empty",
        "truncated",
        "jpeg",
        "bmp",
        "another chunk first",
        "bad signature",
        "second IHDR",
        "zTXt",
        "iTXt",
        "iCCP",
        "zTXt after the image data",
        "APNG",
        "33 chunks",
    ],
)
def test_plain_png_size_is_none_for_anything_else(data: bytes) -> None:
    assert imaging.plain_png_size(data) is None


def test_a_second_ihdr_is_what_pillow_obeys() -> None:
    """Why `plain_png_size` refuses one: Pillow takes the size of the last IHDR before the image data."""
    assert Image.open(io.BytesIO(_with_chunk(GRAY_28, png_chunk(b"IHDR", IHDR_4000)))).size == (4000, 4000)


@pytest.mark.parametrize("colormap", COLORMAPS)
def test_levels_and_colormaps_match_matplotlib_imshow(colormap: str) -> None:
    maps = torch.from_numpy(RNG.standard_normal((3, 17, 19)).astype(np.float32))
    levels = imaging.to_levels(maps, "per_map", 1.0)
    for c in range(3):
        m = maps[c].numpy()
        want = _imshow_pixels(m, colormap)
        got = imaging.colorize(levels.levels[c], colormap)
        got_rgb = np.repeat(got[..., None], 3, axis=2) if got.ndim == 2 else got
        np.testing.assert_array_equal(got_rgb, want)
        assert levels.lo[c] == float(m.min()) and levels.hi[c] == float(m.max())


def _imshow_pixels(m: np.ndarray, colormap: str) -> np.ndarray:
    """What imshow draws for `m`; for gray, the colormap index itself (matplotlib's gray LUT rounds some down)."""
    if colormap == "gray":
        index = ListedColormap(np.repeat(np.arange(256)[:, None] / 256, 3, axis=1))(Normalize()(m))[..., :3]
        return (index * 256).astype(np.uint8)
    return matplotlib.colormaps[colormap](Normalize()(m), bytes=True)[..., :3]


def test_luts_are_matplotlibs() -> None:
    for name in COLORMAPS[1:]:  # gray is the identity by design
        want = matplotlib.colormaps[name](np.arange(256), bytes=True)[:, :3]
        np.testing.assert_array_equal(LUTS[name], want)


def test_level_scales() -> None:
    maps = torch.tensor([[[0.0, 0.5]], [[0.25, 0.25]]])  # (2, 1, 2); the second map is constant
    per_map = imaging.to_levels(maps, "per_map", 1.0)
    assert per_map.levels.tolist() == [[[0, 255]], [[0, 0]]]
    per_stage = imaging.to_levels(maps, "per_stage", 1.0)
    assert per_stage.levels.tolist() == [[[0, 255]], [[128, 128]]]
    assert per_stage.lo == [0.0, 0.0] and per_stage.hi == [0.5, 0.5]
    none = imaging.to_levels(maps, "none", 1.0)
    assert none.levels.tolist() == [[[0, 128]], [[64, 64]]]
    assert none.lo == [0.0, 0.0] and none.hi == [1.0, 1.0]


def test_png_round_trip_and_montage() -> None:
    levels = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(imaging.encode_png(levels)))), levels)
    rows = [
        imaging.MontageRow("stage 0", [("a", levels), ("b", levels)]),
        imaging.MontageRow("stage 1", [("c", LUTS["viridis"][levels])]),
    ]
    picture = Image.open(io.BytesIO(imaging.montage(rows)))
    assert picture.format == "PNG" and picture.mode == "RGB"
    assert picture.width > 2 * 160 and picture.height > 2 * 160  # two columns, two rows of 160 px cells


def test_montage_refuses_too_many_maps() -> None:
    row = imaging.MontageRow("s", [("m", np.zeros((2, 2), np.uint8))] * 5)
    with pytest.raises(LimitExceededError, match="at most 4"):
        imaging.montage([row], max_maps=4)


def _with_transparency(img: Image.Image) -> Image.Image:
    img.info["transparency"] = 0
    return img


def test_an_animation_of_thousands_of_frames_decodes_only_the_first() -> None:
    frames = [Image.new("L", (8, 8), i % 256) for i in range(3000)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=10)
    img = imaging.decode_image(buf.getvalue(), BIG)
    assert img.size == (8, 8) and np.asarray(img.convert("L")).max() == 0


@pytest.mark.parametrize(
    ("make", "fmt", "mode"),
    [
        (lambda: RGB.convert("P"), "PNG", "P"),
        (lambda: _with_transparency(RGB.convert("P")), "PNG", "P"),
        (lambda: RGB.convert("LA"), "PNG", "LA"),
        (lambda: RGB.convert("1"), "PNG", "1"),
        (lambda: RGB.convert("RGBA"), "WEBP", "RGBA"),
        (lambda: RGB.convert("CMYK"), "JPEG", "CMYK"),
        (lambda: Image.fromarray(np.full((12, 10), 40000, np.uint16)), "TIFF", "I;16"),
        (lambda: Image.fromarray(np.full((12, 10), 3.5, np.float32)), "TIFF", "F"),
        (lambda: Image.fromarray(np.full((12, 10), 70000, np.int32)), "TIFF", "I"),
        (lambda: RGB.convert("YCbCr"), "JPEG", "RGB"),
    ],
)
def test_every_mode_converts_to_gray_and_rgb(make: object, fmt: str, mode: str) -> None:
    img = imaging.decode_image(encoded(make(), fmt), BIG)  # type: ignore[operator]
    for color, channels in (("gray", 1), ("rgb", 3)):
        x = imaging.image_to_tensor(img, color, "unit")  # type: ignore[arg-type]
        assert x.shape == (channels, 12, 10) and torch.isfinite(x).all() and 0 <= float(x.min()) <= float(x.max()) <= 1


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "TIFF", "WEBP", "JPEG"])
@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9])
def test_any_truncation_of_any_format_is_a_decode_error_never_a_crash(fmt: str, cut: float) -> None:
    data = encoded(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    try:
        img = imaging.decode_image(data[: int(len(data) * cut)], BIG)
    except ImageDecodeError:
        return
    assert img.size == (64, 64)  # some decoders pad a truncated tail; then the size is still right


@pytest.mark.parametrize("seed", range(40))
def test_random_byte_flips_never_escape_as_other_errors(seed: int) -> None:
    rng = np.random.default_rng(seed)
    fmt = ["PNG", "GIF", "BMP", "TIFF", "WEBP", "JPEG"][seed % 6]
    data = bytearray(encoded(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), fmt))
    for i in rng.integers(0, len(data), 8):
        data[int(i)] = int(rng.integers(0, 256))
    try:
        img = imaging.decode_image(bytes(data), 10_000)
        imaging.image_to_tensor(img, "rgb", "unit")
    except (ImageDecodeError, LimitExceededError):
        pass


def test_parallel_png_encoding_keeps_order_and_pixels() -> None:
    maps = [RNG.integers(0, 256, (300, 300), dtype=np.uint8) for _ in range(6)]
    pngs = imaging.encode_pngs(maps)  # large enough to go through the thread pool
    assert len(pngs) == 6
    for png, m in zip(pngs, maps, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), m)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32])
def test_to_host_copies_values_exactly_from_any_device(device: str, dtype: torch.dtype) -> None:
    """GPU maps come back through pinned memory: same bytes as a plain copy, finished before they are read."""
    values = torch.arange(3 * 65 * 67, dtype=torch.float32).reshape(3, 65, 67).remainder(251).to(dtype)
    host = to_host(values.to(device))
    assert isinstance(host, np.ndarray) and host.shape == (3, 65, 67) and host.dtype == values.numpy().dtype
    np.testing.assert_array_equal(host, values.numpy())
    again = to_host(values.to(device) + 1)  # a reused pinned block holds the new values, not the old
    np.testing.assert_array_equal(again, (values + 1).numpy())
