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
from PIL import Image, ImageOps, PngImagePlugin

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
    # Both are the ITU-R 601-2 luma, rounded; Pillow's weights are 16-bit fixed point (19595, 38470 and 7471 of 65536,
    # each within 5.7e-6 of the standard's), which moves a level by up to 0.0029 more than rounding's 0.5 (0.501 seen).
    assert np.abs(got - exact).max() <= 0.5 + 255 * (4.1e-6 + 5.7e-6 + 1.6e-6)


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


PNG_RNG = np.random.default_rng(11)  # its own: the tables below leave RNG's draws to the tests that used them


def _noise(mode: str, width: int, height: int) -> Image.Image:
    bands = len(Image.new(mode, (1, 1)).getbands())
    pixels = PNG_RNG.integers(0, 256, (height, width, bands), dtype=np.uint8)
    img = Image.fromarray(pixels.squeeze(-1 if bands == 1 else ()))
    assert img.mode == mode
    return img


def _gradient(mode: str, width: int, height: int) -> Image.Image:
    """Smooth rows, for which Pillow's encoder picks each PNG filter type (noise gets mostly one)."""
    return Image.linear_gradient("L").resize((width, height)).convert(mode)


def _set_ihdr(png: bytes, **fields: int) -> bytes:
    """`png` with IHDR fields (`width`, `height`, `color`, `interlace`) changed, its CRC made right."""
    ihdr = bytearray(png[16:29])
    for name, value in fields.items():
        at, size = {"width": (0, 4), "height": (4, 4), "color": (9, 1), "interlace": (12, 1)}[name]
        ihdr[at : at + size] = value.to_bytes(size, "big")
    return png[:8] + png_chunk(b"IHDR", bytes(ihdr)) + png[33:]


def _bad_crc(png: bytes, kind: bytes) -> bytes:
    """`png` with the CRC of its first `kind` chunk off by one bit."""
    at = png.index(kind) - 4
    crc = at + 8 + int.from_bytes(png[at : at + 4], "big")
    return png[:crc] + bytes([png[crc] ^ 1]) + png[crc + 1 :]


def _split_idat(png: bytes, between: bytes = b"") -> bytes:
    """`png` (one IDAT) with its image data in two IDAT chunks, and `between` them."""
    at = png.index(b"IDAT") - 4
    length = int.from_bytes(png[at : at + 4], "big")
    data = png[at + 8 : at + 8 + length]
    half = length // 2
    chunks = png_chunk(b"IDAT", data[:half]) + between + png_chunk(b"IDAT", data[half:])
    return png[:at] + chunks + png[at + 12 + length :]


GAMA = png_chunk(b"gAMA", (45455).to_bytes(4, "big"))
SIMPLE_PNGS = {
    "28x28 gray": encoded(_noise("L", 28, 28), "PNG"),
    "1x1 gray": encoded(Image.new("L", (1, 1), 77), "PNG"),
    "gray gradient": encoded(_gradient("L", 61, 47), "PNG"),
    "rgb": encoded(_noise("RGB", 33, 21), "PNG"),
    "rgb gradient, optimized": encoded(_gradient("RGB", 64, 64), "PNG", optimize=True),
    "gray + alpha": encoded(_noise("LA", 17, 9), "PNG"),
    "rgba": encoded(_noise("RGBA", 40, 3), "PNG"),
    "stored, not compressed": encoded(_noise("RGB", 30, 30), "PNG", compress_level=0),
    "several IDAT": encoded(_noise("RGBA", 300, 200), "PNG"),  # 240 kB of pixels: Pillow writes 64 kB chunks
    "inert chunks": _with_chunk(_with_chunk(GRAY_28, GAMA), png_chunk(b"sRGB", b"\x00")),
    "one IDAT run in two chunks": _split_idat(GRAY_28),
    "dpi": encoded(_noise("L", 28, 28), "PNG", dpi=(300, 300)),  # pHYs
    # A stream that ends a row short: Pillow's decoder stops there, and `Image.open` takes it as it is.
    "too little image data": GRAY_28[:33] + png_chunk(b"IDAT", zlib.compress(bytes(27 * 29))) + GRAY_28[-12:],
}


def _read_by_pillow(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.mark.parametrize("data", SIMPLE_PNGS.values(), ids=SIMPLE_PNGS.keys())
def test_simple_pngs_decode_in_one_call_to_what_pillow_reads(data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """`decode_image` decodes a simple PNG without `Image.open`, to the mode and pixels `Image.open` gives."""
    want = _read_by_pillow(data)
    monkeypatch.setattr(Image, "open", _not_called)
    got = imaging.decode_image(data, BIG)
    assert (got.mode, got.size) == (want.mode, want.size)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _not_called(*args: object, **kwargs: object) -> None:
    raise AssertionError("Image.open was called")


ROTATED = Image.Exif()
ROTATED[0x0112] = 6  # shown turned 90 degrees clockwise
OTHER_PNGS = {
    "16-bit": encoded(Image.new("I;16", (5, 5), 300), "PNG"),
    "1-bit": encoded(Image.new("1", (9, 9), 1), "PNG"),
    "palette": encoded(_noise("RGB", 8, 8).convert("P"), "PNG"),
    "transparent gray (tRNS)": encoded(_noise("L", 8, 8), "PNG", transparency=0),
    "interlaced": _set_ihdr(GRAY_28, interlace=1),
    "colour type 5": _set_ihdr(GRAY_28, color=5),
    "EXIF": encoded(_noise("RGB", 8, 4), "PNG", exif=ROTATED),
    "tEXt (may hold EXIF)": _text_png(),
    "gAMA of 3 bytes": _with_chunk(GRAY_28, png_chunk(b"gAMA", b"\x00\x00\x01")),
    "gAMA after the data": _with_chunk(GRAY_28, GAMA, after_ihdr=False),
    "bad IHDR CRC": _bad_crc(GRAY_28, b"IHDR"),
    "bad IDAT CRC": _bad_crc(GRAY_28, b"IDAT"),
    "IDAT, gAMA, IDAT": _split_idat(GRAY_28, GAMA),
    "bytes after IEND": GRAY_28 + b"\x00",
    "no IEND": GRAY_28[:-12],
    "truncated": GRAY_28[:-20],
    "corrupt image data": GRAY_28[:33] + png_chunk(b"IDAT", b"not a zlib stream") + GRAY_28[-12:],
    "33 chunks": _with_chunk(GRAY_28, GAMA * 30),
    "no pixels": _set_ihdr(GRAY_28, width=0),
    "over the limit": _set_ihdr(GRAY_28, width=5000, height=5000),
}


@pytest.mark.parametrize("data", OTHER_PNGS.values(), ids=OTHER_PNGS.keys())
def test_other_pngs_are_left_to_pillow(data: bytes) -> None:
    """Whatever is not simple is `Image.open`'s to read, accept or refuse, and `decode_image` does as it does."""
    assert imaging._decode_simple_png(data, 16_000_000) is None
    try:
        want: Image.Image | None = _read_by_pillow(data)
    except Exception:
        want = None
    if want is None or want.width * want.height > 16_000_000:
        with pytest.raises((ImageDecodeError, UnsupportedMediaError, LimitExceededError)):
            imaging.decode_image(data, 16_000_000)
        return
    got = imaging.decode_image(data, 16_000_000)
    assert got.mode == want.mode
    np.testing.assert_array_equal(np.asarray(ImageOps.exif_transpose(want)), np.asarray(got))


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
    given = imaging.to_levels(maps, "per_stage", 1.0, (0.0, 0.5))  # the stage's extremes, found by the pipeline
    assert (given.levels.tolist(), given.lo, given.hi) == (per_stage.levels.tolist(), per_stage.lo, per_stage.hi)
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
    del host  # its pinned block is free: the next copy of this size reuses it
    again = to_host(values.to(device) + 1)  # a reused pinned block holds the new values, not the old
    np.testing.assert_array_equal(again, (values + 1).numpy())
