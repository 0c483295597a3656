"""GET /: the demo page (plain HTML/CSS/JS from service/static, no build step, works offline), its assets and
the sample images under /static/, and the colormap tables the page reads values back from PNG levels with."""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import Annotated

import orjson
from fastapi import APIRouter, Header, HTTPException
from starlette.responses import Response

from service.colormaps import LUTS

PACKAGE_DIR = Path(__file__).resolve().parent.parent
STATIC_DIR = PACKAGE_DIR / "static"
SAMPLES_DIR = PACKAGE_DIR / "samples"

# Explicit types, not the host's mimetypes database, so every machine serves the same headers.
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
SAMPLE_TYPES = {".jpg": "image/jpeg", ".png": "image/png"}
_ASSET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.[a-z0-9]+$")

# The page runs only what this server sends and talks only to it: no CDN, no inline script, nothing framed.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# No build step means no content-hashed file names, so browsers revalidate every time (a 304 when unchanged)
# rather than run a stale script against a newer API after a deploy.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(include_in_schema=False)

IfNoneMatch = Annotated[str | None, Header()]


def _asset(body: bytes, media_type: str, if_none_match: str | None, page: bool = False) -> Response:
    """`body` with a strong ETag of its content, or a bodiless 304 when the client already holds it."""
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {**_HEADERS, "ETag": etag}
    if page:
        headers |= {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Referrer-Policy": "no-referrer"}
    if if_none_match is not None:
        offered = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        if etag in offered or "*" in offered:
            return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


def _read(directory: Path, name: str, types: dict[str, str]) -> tuple[bytes, str]:
    """A file directly inside `directory` with a known suffix; a 404 problem for anything else."""
    path = directory / name
    media_type = types.get(path.suffix)
    if not _ASSET_NAME.match(name) or media_type is None or not path.is_file():
        raise HTTPException(404, f"no demo file {name!r}")
    return path.read_bytes(), media_type


@router.api_route("/", methods=["GET", "HEAD"])
def show_demo_page(if_none_match: IfNoneMatch = None) -> Response:
    """The demo page."""
    body, media_type = _read(STATIC_DIR, "index.html", STATIC_TYPES)
    return _asset(body, media_type, if_none_match, page=True)


@functools.cache
def _colormaps_json() -> bytes:
    return orjson.dumps({name: lut.tobytes().hex() for name, lut in LUTS.items()})


@router.api_route("/static/colormaps.json", methods=["GET", "HEAD"])
def get_colormaps(if_none_match: IfNoneMatch = None) -> Response:
    """Each colormap's 256 RGB colours as hex (level L at bytes 3L..3L+2), so the page can invert PNG maps."""
    return _asset(_colormaps_json(), "application/json", if_none_match)


@router.api_route("/static/samples/{name}", methods=["GET", "HEAD"])
def get_sample_image(name: str, if_none_match: IfNoneMatch = None) -> Response:
    """A bundled sample image (the tutorial's dog, an MNIST digit)."""
    return _asset(*_read(SAMPLES_DIR, name, SAMPLE_TYPES), if_none_match)


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
def get_static_asset(name: str, if_none_match: IfNoneMatch = None) -> Response:
    """The page's scripts, style sheet and icon."""
    return _asset(*_read(STATIC_DIR, name, STATIC_TYPES), if_none_match)
