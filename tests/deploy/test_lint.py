"""The deployment files pass the tools that judge them without running them: hadolint (Dockerfile), the Compose
specification's JSON schema (docker-compose.yml), kubernetes-validate (deploy/k8s/) and `nginx -t` (deploy/nginx/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT
from tests.deploy.harness import NGINX_DIR, local_site, nginx_prefix

BIN = Path(sys.executable).parent
# The oldest Kubernetes minor release still maintained upstream when this was written; the manifests use nothing
# newer. kubernetes-validate ships the schemas of each release it knows, so this runs offline.
KUBERNETES_VERSION = "1.33.0"
K8S_MANIFESTS = sorted((ROOT / "deploy" / "k8s").rglob("*.yaml"))


def run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = run(BIN / "hadolint", "--config", ROOT / ".hadolint.yaml", "--no-color", "Dockerfile")
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_the_hadolint_config_fails_on_every_finding_and_ignores_no_rule() -> None:
    config = yaml.safe_load((ROOT / ".hadolint.yaml").read_text())
    assert config.get("failure-threshold") == "style" and not config.get("ignored")


def test_the_compose_file_follows_the_compose_specification() -> None:
    # check-jsonschema vendors the specification's schema (compose-spec/compose-spec, Apache-2.0): no download.
    result = run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_kubernetes_manifests_validate_strictly() -> None:
    assert len(K8S_MANIFESTS) >= 5  # Deployment, Service, HPA, PDB; the GPU Deployment and Service
    result = run(BIN / "kubernetes-validate", "--strict", "--kubernetes-version", KUBERNETES_VERSION, *K8S_MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed for resource") == len(K8S_MANIFESTS), result.stdout


def test_nginx_accepts_the_config() -> None:
    # The repository's nginx.conf and listen.conf as they are; its upstream with the compose host names (which do not
    # resolve here, and nginx -t resolves them) moved to 127.0.0.1, keeping their ports and parameters.
    site = {"listen.conf": (NGINX_DIR / "listen.conf").read_text(), "upstream.conf": local_site([8000], 8080)["upstream.conf"]}  # fmt: skip
    with nginx_prefix(site) as prefix:
        proc = prefix.run("-t")
        assert proc.wait(60) == 0, prefix.log.read_text()
        assert "test is successful" in prefix.log.read_text()


def test_prometheus_scrapes_metrics_of_every_service_built_from_the_image() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    built = {name for name, service in compose["services"].items() if "build" in service}
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    scraped = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sd in job.get("dns_sd_configs", []):
            assert sd["port"] == 8000
            scraped |= set(sd["names"])
    assert scraped == built
    assert any("./deploy/prometheus/prometheus.yml:" in v for v in compose["services"]["prometheus"]["volumes"])
