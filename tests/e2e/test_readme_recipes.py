"""The README's "Use it with curl" recipes, run as written (bash and python) against a real server: every command
exits 0 and answers what it says, and every endpoint has one."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.e2e.test_server import wait_ready

pytestmark = pytest.mark.e2e

README_URL = "http://127.0.0.1:8000"
SECTION = re.search(r"^## Use it with curl\n(.*?)^## ", (ROOT / "README.md").read_text(), re.S | re.M)
assert SECTION, "README.md has no '## Use it with curl' section"
BLOCKS = re.findall(r"^```(sh|python)\n(.*?)^```", SECTION.group(1), re.S | re.M)
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
URL = re.compile(re.escape(README_URL) + r"(/[^\s'\"]*)?")


@dataclass(frozen=True)
class Command:
    block: int
    text: str
    setup: tuple[str, ...]  # the block's earlier variable assignments, which this command may read

    @property
    def path(self) -> str:
        urls = URL.findall(self.text)
        return (urls[-1] or "/") if urls else ""


def _complete(text: str) -> bool:
    """Whether `text` is a whole shell command (no open quote, no trailing pipe or backslash)."""
    if text.rstrip().endswith(("\\", "|", "&&")):
        return False
    return subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True).returncode == 0


def shell_commands() -> list[Command]:
    commands: list[Command] = []
    for i, (lang, body) in enumerate(BLOCKS):
        if lang != "sh":
            continue
        setup: list[str] = []
        pending = ""
        for line in body.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            pending += line + "\n"
            if _complete(pending):
                commands.append(Command(i, pending.strip(), tuple(setup)))
                if ASSIGNMENT.match(pending):
                    setup.append(pending.strip())
                pending = ""
        assert not pending, f"an unfinished command in the README: {pending!r}"
    return commands


COMMANDS = shell_commands()
PYTHON = [body for lang, body in BLOCKS if lang == "python"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, base_url: str) -> Path:
    """An empty directory where `service/samples/...` resolves, as at the repository root; `-o` files land here."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        wait_ready(client)
    path = tmp_path_factory.mktemp("readme")
    (path / "service").symlink_to(ROOT / "service")
    return path


def run_shell(command: Command, base_url: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    script = "\n".join(["set -eo pipefail", *command.setup, command.text]).replace(README_URL, base_url)
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, timeout=120)


def _label(body: dict[str, Any]) -> int:
    return int(body["label"])


# What the JSON answer of a command on each path says (beyond parsing as JSON).
ANSWERS: dict[str, Any] = {
    "/healthz": lambda b: b == {"status": "ok"},
    "/readyz": lambda b: b == {"status": "ok"},
    "/predict": lambda b: _label(b) == 7 and b["preprocessing"]["mode"] == "mnist",
    "/v1/predict": lambda b: _label(b) == 7 and len(b["top_k"]) in (2, 5),
    "/v2": lambda b: b["extensions"] == ["binary_tensor_data"],
    "/v2/health/live": lambda b: b == {"live": True},
    "/v2/health/ready": lambda b: b == {"ready": True},
    "/v2/models/cnn": lambda b: b["name"] == "cnn" and b["inputs"][0]["shape"] == [-1, 1, 28, 28],
    "/v2/models/mlp/versions/1": lambda b: b["name"] == "mlp" and b["versions"] == ["1"],
    "/v2/models/cnn/ready": lambda b: b == {"name": "cnn", "ready": True},
    "/v2/models/cnn/infer": lambda b: b["id"] == "one" and max(range(10), key=b["outputs"][0]["data"].__getitem__) == 1,
    "/problems/invalid-spec": lambda b: b["status"] == 422 and b["type"] == "/problems/invalid-spec",
}


def check_output(command: Command, out: bytes, cwd: Path) -> None:
    """What each form of command prints: a file (-o), a status line and a problem (-i), a cut-off JSON
    document (cut -c -300), metric lines (grep), or a whole JSON document."""
    text = command.text
    written = re.search(r"-o (\S+)", text)
    if "grep -o '<title>" in text:  # the demo page
        assert out.decode().strip() == "<title>Feature Map Service: demo</title>", out
    elif written:
        data = (cwd / written.group(1)).read_bytes()
        assert out == b"" and data.startswith(b"\x89PNG\r\n\x1a\n"), data[:40]
        assert Image.open(io.BytesIO(data)).size > (100, 100)
    elif " -i " in text:
        head, _, body = out.decode().partition("\r\n\r\n")
        assert re.match(r"HTTP/1\.1 4\d\d ", head), head
        assert "content-type: application/problem+json" in head.lower(), head
        problem = json.loads(body)
        assert problem["status"] == 422 and problem["type"] == "/problems/invalid-request", problem
        assert problem["errors"][0]["field"] == "layers[0].size"
    elif re.search(r"\|\s*cut -c -300$", text):
        assert out[:1] in (b"{", b"[") and len(out) <= 301, out[:100]
    elif re.search(r"\|\s*grep ", text):
        lines = out.decode().splitlines()
        assert lines and all(line.startswith("featuremap_requests_total{") for line in lines), lines[:3]
    elif ASSIGNMENT.match(text):
        assert out == b""
    else:
        body = json.loads(out)
        check = ANSWERS.get(command.path)
        assert check is not None, f"no expected answer for {command.path}: add it to ANSWERS"
        assert check(body), body


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.block}:{c.path}" for c in COMMANDS])
def test_shell_recipe(command: Command, base_url: str, workdir: Path) -> None:
    run = run_shell(command, base_url, workdir)
    assert run.returncode == 0, run.stderr.decode() + run.stdout.decode()[:2000]
    assert run.stderr == b"", run.stderr.decode()
    check_output(command, run.stdout, workdir)


def test_python_recipe(base_url: str, workdir: Path) -> None:
    [code] = PYTHON
    assert importlib.util.find_spec("httpx"), "the README promises httpx: requirements-dev.in pins it"
    run = subprocess.run(
        [sys.executable, "-c", code.replace(README_URL, base_url)],
        cwd=workdir,
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr.decode()
    first, second = run.stdout.decode().splitlines()
    assert first.startswith("7 [{'label': 7, "), first  # /v1/predict: label and top 3
    assert second == "[7]"  # /v2 argmax


def test_every_endpoint_has_a_recipe() -> None:
    """Every operation in the OpenAPI document (a versioned /v2 route counts as its unversioned twin), and the
    document itself, is called by some README command."""
    doc = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    paths = {c.path for c in COMMANDS}
    missing = []
    for template in [*doc["paths"], "/openapi.json"]:
        plain = template.replace("/versions/{version}", "") if template.endswith(("/ready", "/infer")) else template
        pattern = re.compile(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(plain)))
        if not any(pattern.fullmatch(p) for p in paths):
            missing.append(template)
    assert not missing, f"README recipes lack {missing}"
