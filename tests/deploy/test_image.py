"""The image's entry command, read from the Dockerfile (final ENV, WORKDIR, CMD, HEALTHCHECK) and run as a plain
process here with the same environment, serves the app; its health check passes while it runs and fails after."""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.conftest import ROOT
from tests.deploy.harness import DOCKERFILE, image_instances, instructions, parse_dockerfile

pytestmark = pytest.mark.e2e


def test_the_image_is_configured_as_the_deployment_expects() -> None:
    image = parse_dockerfile(base_env={"PATH": "/usr/local/bin:/usr/bin:/bin"})
    assert image.cmd[:3] == ["python", "-m", "service"] and "--workers" not in image.cmd  # workers: WEB_CONCURRENCY
    assert "WEB_CONCURRENCY" not in image.env  # the service's default: a worker per usable CPU (at most 4)
    assert image.env["PATH"].startswith(f"{image.env['VIRTUAL_ENV']}/bin:")
    assert image.user.split(":")[0] not in ("", "0", "root")
    assert image.healthcheck[0] == "python" and "/healthz" in " ".join(image.healthcheck)  # no curl in a slim image


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    # .dockerignore is an allow-list: everything out ("*"), then each path the image copies back in.
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [rule for rule in rules if rule and not rule.startswith("#")]
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert rules[0] == "*"
    copied = set()
    for keyword, args in instructions(DOCKERFILE.read_text()):
        words = args.split()
        if keyword in ("COPY", "ADD") and not any(w.startswith("--from=") for w in words):
            copied |= {w.rstrip("/") for w in words[:-1] if not w.startswith("--")}
    assert copied == allowed
    assert all((ROOT / path).exists() for path in copied)


def test_the_entry_command_serves_readiness_and_passes_its_health_check() -> None:
    with image_instances(1) as (instance,):
        # Ready (image_instances waits for /readyz 200); the HEALTHCHECK command, run with the image's environment.
        env = instance.run.env
        check = subprocess.run(instance.run.healthcheck, env=env, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        assert any(e["path"] == "/healthz" and e["status"] == 200 for e in instance.access_log())

        instance.proc.send_signal(signal.SIGTERM)  # what docker stop sends to PID 1
        # uvicorn re-raises the signal after its graceful shutdown (as PID 1, where it is ignored, the exit is 0).
        assert instance.proc.wait(60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in instance.log.read_text()
        check = subprocess.run(instance.run.healthcheck, env=env, capture_output=True, text=True, timeout=30)
        assert check.returncode == 1, (check.returncode, check.stderr)  # Docker's "unhealthy"
