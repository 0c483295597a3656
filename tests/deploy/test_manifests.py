"""The deployment files agree with the service and with each other: shutdown grace periods cover the service's
drain, probes hit the right endpoints, the pods run as the image's user, and the GPU variants ask for a GPU."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings
from tests.conftest import ROOT
from tests.deploy.harness import parse_dockerfile

K8S = ROOT / "deploy" / "k8s"
DEPLOYMENTS = [K8S / "deployment.yaml", K8S / "gpu" / "deployment.yaml"]
IMAGE = parse_dockerfile()
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
FROM_IMAGE = {name: s for name, s in COMPOSE["services"].items() if "build" in s}


def uvicorn_graceful_timeout() -> float:
    """`timeout_graceful_shutdown` as service/__main__.py passes it to uvicorn.run."""
    tree = ast.parse((ROOT / "service" / "__main__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "timeout_graceful_shutdown":
            return float(ast.literal_eval(node.value))
    raise AssertionError("service/__main__.py sets no timeout_graceful_shutdown")


def seconds(duration: str | int) -> float:
    """A compose duration ("1m30s", "45s") or a number of seconds."""
    if isinstance(duration, int):
        return duration
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, f"unsupported duration {duration!r}"
    return int(parts[1] or 0) * 60 + int(parts[2] or 0)


def shutdown_delay(env: dict[str, str]) -> float:
    return float(env.get("FEATUREMAP_SHUTDOWN_DELAY_S", Settings.model_fields["shutdown_delay_s"].default))


def pod(path: Path) -> dict[str, Any]:
    deployment = yaml.safe_load(path.read_text())
    assert deployment["kind"] == "Deployment"
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


@pytest.mark.parametrize("path", DEPLOYMENTS, ids=lambda p: str(p.relative_to(K8S)))
def test_kubernetes_waits_for_the_drain_before_killing_the_pod(path: Path) -> None:
    spec = pod(path)
    (container,) = spec["containers"]
    needed = shutdown_delay(container_env(container)) + uvicorn_graceful_timeout()
    assert spec["terminationGracePeriodSeconds"] > needed
    assert shutdown_delay(container_env(container)) > 0  # endpoints are removed while the pod still serves


@pytest.mark.parametrize("path", DEPLOYMENTS, ids=lambda p: str(p.relative_to(K8S)))
def test_kubernetes_probes_resources_and_security(path: Path) -> None:
    spec = pod(path)
    (container,) = spec["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert [p["containerPort"] for p in container["ports"]] == IMAGE.exposed
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys() <= container["resources"]["limits"].keys()
    uid, gid = (int(part) for part in IMAGE.user.split(":"))
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == uid != 0
    assert spec["securityContext"]["runAsGroup"] == gid
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # The one place the service writes (spooled uploads) is a volume.
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
    # Workers x compute slots x torch threads fit the CPU limit.
    env = container_env(container)
    threads = int(env.get("WEB_CONCURRENCY", "1"))
    threads *= int(env["FEATUREMAP_MAX_CONCURRENCY"]) * int(env["FEATUREMAP_TORCH_THREADS"])
    assert threads <= int(container["resources"]["limits"]["cpu"])


def test_the_gpu_deployment_gets_a_gpu_and_the_cuda_image() -> None:
    spec = pod(K8S / "gpu" / "deployment.yaml")
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert spec["nodeSelector"] and container["image"].endswith("-cuda")
    (cpu_container,) = pod(K8S / "deployment.yaml")["containers"]
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]


def test_the_services_and_the_autoscaler_select_their_deployments() -> None:
    for directory in (K8S, K8S / "gpu"):
        deployment = yaml.safe_load((directory / "deployment.yaml").read_text())
        service = yaml.safe_load((directory / "service.yaml").read_text())
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert service["spec"]["ports"][0]["targetPort"] == "http"
    hpa = yaml.safe_load((K8S / "hpa.yaml").read_text())
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["scaleTargetRef"]["name"] == "featuremap"


@pytest.mark.parametrize("name", sorted(FROM_IMAGE))
def test_compose_waits_for_the_drain_and_checks_health_as_the_image_does(name: str) -> None:
    service = FROM_IMAGE[name]
    needed = shutdown_delay(service["environment"]) + uvicorn_graceful_timeout()
    assert seconds(service["stop_grace_period"]) > needed
    assert service["healthcheck"]["test"] == ["CMD", *IMAGE.healthcheck]
    assert service["read_only"] and "/tmp" in service["tmpfs"]


def test_the_compose_gpu_profile_builds_cuda_torch_and_reserves_an_nvidia_gpu() -> None:
    gpu = COMPOSE["services"]["featuremap-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert "/whl/cu" in gpu["build"]["args"]["TORCH_INDEX_URL"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_the_compose_scale_profile_puts_replicas_behind_the_repositorys_nginx_config() -> None:
    services = COMPOSE["services"]
    assert services["featuremap-replica"]["deploy"]["replicas"] >= 2
    assert "ports" not in services["featuremap-replica"]
    nginx = services["nginx"]
    assert services["featuremap-replica"]["profiles"] == nginx["profiles"] == ["scale"]
    mounted = {volume.split(":")[0] for volume in nginx["volumes"]}
    assert mounted == {f"./deploy/nginx/{name}" for name in ("nginx.conf", "upstream.conf", "listen.conf")}
    upstream = (ROOT / "deploy" / "nginx" / "upstream.conf").read_text()
    assert re.search(r"^server featuremap-replica:8000\b", upstream, flags=re.M)
