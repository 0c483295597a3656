"""The demo page and its assets: served without a key, only local resources, right types, cache validators."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.colormaps import LUTS
from tests.conftest import DOG, ROOT, make_client

STATIC = ROOT / "service" / "static"
SAMPLES = ROOT / "service" / "samples"

# Any URL that names a host: http(s)://host, or a protocol-relative //host.
REMOTE_URL = re.compile(r"(?i)(?:\bhttps?:)?//[a-z0-9-]+(?:\.[a-z0-9-]+)+")
HTML_REFS = re.compile(r"""(?:src|href)="([^"]+)\"""")
JS_IMPORTS = re.compile(r"""\bfrom '\./([\w.-]+)'""")
JS_PATHS = re.compile(r"""'(/static/[\w./-]+)'""")


def page_assets() -> set[str]:
    """Every local path the page loads: the HTML's links and scripts, the modules they import, what they fetch."""
    html = (STATIC / "index.html").read_text()
    paths = {ref for ref in HTML_REFS.findall(html) if ref.startswith("/static/")}
    for script in STATIC.glob("*.js"):
        text = script.read_text()
        paths |= {f"/static/{name}" for name in JS_IMPORTS.findall(text)} | set(JS_PATHS.findall(text))
    return paths


def test_the_page_is_html_that_loads_its_modules_and_style() -> None:
    with make_client() as client:
        r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="/static/demo.js"></script>' in r.text
    assert '<link rel="stylesheet" href="/static/demo.css">' in r.text
    assert r.headers["cache-control"] == "no-cache" and r.headers["etag"]
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp


def test_the_page_lists_every_asset_the_tests_know_of() -> None:
    wanted = {f"/static/{p.name}" for p in STATIC.iterdir() if p.name != "index.html"}
    assert wanted | {"/static/colormaps.json", "/static/samples/dog.jpg"} <= page_assets()  # nothing shipped unused


@pytest.mark.parametrize("path", sorted(STATIC.iterdir()), ids=lambda p: p.name)
def test_no_asset_refers_to_another_host(path: Path) -> None:
    text = path.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")  # a namespace name, never fetched
    assert REMOTE_URL.findall(text) == []  # no CDN, no web fonts: the page works offline
    if path.suffix == ".css":
        assert "@import" not in text and "url(" not in text


EXPECTED_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".jpg": "image/jpeg",
}


def test_every_asset_is_served_with_its_type_and_no_key() -> None:
    with make_client(api_keys=["s3cret"]) as client:
        assert client.get("/v1/filters").status_code == 401  # the API needs the key...
        assert client.get("/").status_code == 200  # ...the page and its assets do not: it asks for the key
        for path in sorted(page_assets()):
            r = client.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-type"] == EXPECTED_TYPES[Path(path).suffix], path
            assert r.headers["x-content-type-options"] == "nosniff"


def test_the_sample_images_are_served_as_they_are(client: TestClient) -> None:
    r = client.get("/static/samples/dog.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == DOG.read_bytes()
    r = client.get("/static/samples/digit.png")
    assert r.headers["content-type"] == "image/png" and r.content == (SAMPLES / "digit.png").read_bytes()


def test_the_colormaps_are_the_ones_the_service_paints_with(client: TestClient) -> None:
    tables = client.get("/static/colormaps.json").json()
    assert set(tables) == set(LUTS)
    for name, lut in LUTS.items():
        assert np.array_equal(np.frombuffer(bytes.fromhex(tables[name]), np.uint8).reshape(256, 3), lut), name


@pytest.mark.parametrize("path", ["/", "/static/demo.js", "/static/samples/dog.jpg", "/static/colormaps.json"])
def test_a_client_holding_the_current_version_gets_304(client: TestClient, path: str) -> None:
    etag = client.get(path).headers["etag"]
    r = client.get(path, headers={"If-None-Match": f'W/"stale", {etag}'})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    assert client.get(path, headers={"If-None-Match": '"stale"'}).status_code == 200
    assert client.head(path).status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/static/nope.js",
        "/static/samples/README.md",  # a sample directory file that is not an image
        "/static/samples/nope.png",
        "/static/..%2Fmain.py",
        "/static/samples/..%2F..%2Fservice%2Fmain.py",
        "/static/.hidden.js",
        "/static/samples",
    ],
)
def test_anything_else_under_static_is_a_404_problem(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"


def test_the_page_stays_out_of_the_openapi_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/static")]
