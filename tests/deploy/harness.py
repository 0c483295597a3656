"""What the deploy tests run without containers: the image's entry command read from the Dockerfile and run as a
plain process, and the repository's nginx config run unprivileged in a temporary prefix."""

from __future__ import annotations

import copy
import json
import os
import posixpath
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.conftest import ROOT
from tests.e2e.test_server import free_port

DOCKERFILE = ROOT / "Dockerfile"
NGINX_DIR = ROOT / "deploy" / "nginx"
NGINX_MISSING = (
    "nginx is not installed: `make test` installs it (the Makefile's system-tools target apt-installs chromium, "
    "chromium-driver and nginx)"
)

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `check` until it is true; fail naming `what` if `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# --- The Dockerfile -------------------------------------------------------------------------------------------


@dataclass
class ImageConfig:
    """What `docker run` takes from a Dockerfile's final stage."""

    env: dict[str, str]  # ENV, expanded as Docker expands it, over the base image's environment
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str = "root"
    exposed: list[int] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comments and directives dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # also comment lines inside a continued instruction, as Docker does
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, args = (current + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


def _expand(value: str, env: Mapping[str, str]) -> str:
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)


def _exec_form(args: str, what: str) -> list[str]:
    try:
        argv = json.loads(args)
    except json.JSONDecodeError:
        argv = None
    assert isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv), (
        f"{what} must be in exec form (a JSON array of strings), got: {args}"
    )
    return argv


def parse_dockerfile(path: Path = DOCKERFILE, base_env: Mapping[str, str] | None = None) -> ImageConfig:
    """The final stage's run-time configuration; `base_env` stands for the base image's environment."""
    stages: dict[str, ImageConfig] = {}
    image: ImageConfig | None = None
    for keyword, args in instructions(path.read_text()):
        if keyword == "FROM":
            words = args.split()
            base = words[0].lower()
            image = copy.deepcopy(stages[base]) if base in stages else ImageConfig(env=dict(base_env or {}))
            if len(words) == 3 and words[1].upper() == "AS":
                stages[words[2].lower()] = image
            continue
        assert image is not None, f"{keyword} before FROM"
        if keyword == "ENV":
            before = dict(image.env)  # one ENV instruction sees only the values set before it
            tokens = shlex.split(args)
            if tokens and "=" not in tokens[0]:  # the legacy form: ENV KEY value with spaces
                tokens = [f"{tokens[0]}={' '.join(tokens[1:])}"]
            for token in tokens:
                key, _, value = token.partition("=")
                image.env[key] = _expand(value, before)
        elif keyword == "CMD":
            image.cmd = _exec_form(args, "CMD")
        elif keyword == "ENTRYPOINT":
            raise AssertionError("the tests expect the image to run its CMD, without an ENTRYPOINT")
        elif keyword == "HEALTHCHECK":
            options, sep, command = args.partition(" CMD ")
            assert sep, f"HEALTHCHECK without CMD: {args}"
            image.healthcheck = _exec_form(command.strip(), "HEALTHCHECK CMD")
        elif keyword == "WORKDIR":
            image.workdir = posixpath.join(image.workdir, _expand(args, image.env))
        elif keyword == "USER":
            image.user = _expand(args, image.env)
        elif keyword == "EXPOSE":
            image.exposed += [int(p.split("/")[0]) for p in args.split()]
    assert image is not None, "no FROM in the Dockerfile"
    return image


@dataclass(frozen=True)
class HostRun:
    """The image's command, environment and healthcheck as a process on this machine runs them."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    healthcheck: list[str]
    port: int


def as_host_process(image: ImageConfig, port: int) -> HostRun:
    """Map the container onto this machine: its venv is ours, its WORKDIR the repository (the image copies the
    package and the weights there as they lie here), 0.0.0.0 is 127.0.0.1 and its one exposed port is `port`."""
    assert len(image.exposed) == 1, f"expected one exposed port, got {image.exposed}"
    container_port = str(image.exposed[0])
    venv = image.env.get("VIRTUAL_ENV")
    assert venv, "the image should name its venv in ENV VIRTUAL_ENV"
    env = {key: value.replace(venv, sys.prefix) for key, value in image.env.items()}
    argv = ["127.0.0.1" if a == "0.0.0.0" else str(port) if a == container_port else a for a in image.cmd]
    assert str(port) in argv and "127.0.0.1" in argv, f"CMD does not bind 0.0.0.0:{container_port}: {image.cmd}"
    healthcheck = [a.replace(f":{container_port}/", f":{port}/") for a in image.healthcheck]
    assert healthcheck != image.healthcheck, f"HEALTHCHECK does not probe port {container_port}: {image.healthcheck}"
    return HostRun(argv, env, ROOT, healthcheck, port)


@dataclass
class Instance:
    """One `python -m service` started from the image's command, with its log in a file."""

    run: HostRun
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.run.port}"

    def is_ready(self) -> bool:
        assert self.proc.poll() is None, f"the service exited with {self.proc.returncode}:\n{self.log.read_text()}"
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def access_log(self) -> list[dict[str, object]]:
        """The service's one JSON line per request."""
        lines = (json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{"))
        return [entry for entry in lines if entry.get("logger") == "service.access"]


@contextmanager
def image_instances(count: int, **settings: str) -> Iterator[list[Instance]]:
    """`count` processes run as the image runs its CMD, each on a free port, FEATUREMAP_* `settings` added;
    started together, yielded once all are ready, stopped (SIGTERM, then SIGKILL) afterwards."""
    image = parse_dockerfile(base_env=os.environ)
    instances: list[Instance] = []
    try:
        for _ in range(count):
            run = as_host_process(image, free_port())
            env = {**run.env, **{f"FEATUREMAP_{k.upper()}": v for k, v in settings.items()}}
            executable = shutil.which(run.argv[0], path=env["PATH"])
            assert executable and executable.startswith(sys.prefix), f"{run.argv[0]} is not the venv's: {executable}"
            # A file, not a pipe: a pipe nobody reads would fill up and block the server's logging.
            with tempfile.NamedTemporaryFile(prefix="featuremap-", suffix=".log", delete=False) as out:
                proc = subprocess.Popen(run.argv, cwd=run.cwd, env=env, stdout=out, stderr=out)
            instances.append(Instance(run, proc, Path(out.name)))
        for instance in instances:
            wait_until(instance.is_ready, 90, f"{instance.url}/readyz to answer 200")
        yield instances
    finally:
        for instance in instances:
            if instance.proc.poll() is None:
                instance.proc.terminate()
        for instance in instances:
            try:
                instance.proc.wait(45)
            except subprocess.TimeoutExpired:
                instance.proc.kill()
                instance.proc.wait()
            instance.log.unlink(missing_ok=True)


# --- nginx ----------------------------------------------------------------------------------------------------


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if not found:
        pytest.fail(NGINX_MISSING)
    return found


def local_site(upstream_ports: list[int], listen_port: int) -> dict[str, str]:
    """The repository's upstream.conf and listen.conf with their addresses moved to 127.0.0.1: one `server` line
    per port, each with the repository's parameters (max_fails, ...)."""
    upstream = (NGINX_DIR / "upstream.conf").read_text()
    servers = re.findall(r"^\s*server\s+\S+?(\s[^;]*)?;", upstream, flags=re.M)
    assert len(servers) == 1, f"expected one server line (compose's replicated service) in upstream.conf: {servers}"
    listen, count = re.subn(r"^(\s*listen\s+)\S+?([\s;])", rf"\g<1>127.0.0.1:{listen_port}\2", (NGINX_DIR / "listen.conf").read_text(), flags=re.M)  # fmt: skip
    assert count == 1, "expected one listen line in listen.conf"
    lines = "".join(f"server 127.0.0.1:{port}{servers[0]};\n" for port in upstream_ports)
    return {"upstream.conf": lines, "listen.conf": listen}


@dataclass
class NginxPrefix:
    """A temporary nginx prefix: the repository's nginx.conf, unchanged, beside the given site files; owned by an
    unprivileged user (nobody when the tests run as root), who runs nginx."""

    path: Path
    log: Path
    user: int | None  # None: as whoever runs the tests
    group: int | None

    def run(self, *extra: str, **popen: object) -> subprocess.Popen[bytes]:
        """nginx in the foreground with this prefix (and `extra` options, e.g. -t), its output to the log."""
        conf = self.path / "nginx.conf"
        cmd = [nginx_binary(), "-p", f"{self.path}/", "-c", str(conf), "-e", "stderr", "-g", "pid nginx.pid; daemon off;", *extra]  # fmt: skip
        with self.log.open("ab") as out:
            return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
                cmd, stdout=out, stderr=out, user=self.user, group=self.group,
                extra_groups=None if self.user is None else [], **popen,
            )  # fmt: skip


@contextmanager
def nginx_prefix(site: dict[str, str]) -> Iterator[NginxPrefix]:
    path = Path(tempfile.mkdtemp(prefix="featuremap-nginx-"))
    try:
        shutil.copy(NGINX_DIR / "nginx.conf", path / "nginx.conf")
        for name, text in site.items():
            (path / name).write_text(text)
        log = path / "nginx.log"
        log.touch()
        user = group = None
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            user, group = nobody.pw_uid, nobody.pw_gid
            for p in [path, *path.iterdir()]:
                os.chown(p, user, group)
        yield NginxPrefix(path, log, user, group)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def running_nginx(upstream_ports: list[int]) -> Iterator[str]:
    """nginx with the repository's config in front of `upstream_ports` on 127.0.0.1; yields its URL once it
    passes requests through; stopped gracefully afterwards (and its process group killed if it lingers)."""
    listen_port = free_port()
    with nginx_prefix(local_site(upstream_ports, listen_port)) as prefix:
        proc = prefix.run(start_new_session=True)
        url = f"http://127.0.0.1:{listen_port}"
        try:

            def passes() -> bool:
                assert proc.poll() is None, f"nginx exited with {proc.returncode}:\n{prefix.log.read_text()}"
                try:
                    return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(passes, 20, "nginx to pass /healthz through")
            yield url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the master and its workers
                proc.wait()
