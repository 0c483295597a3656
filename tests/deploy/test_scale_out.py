"""Scale-out without containers: two instances of the image's command behind nginx running the repository's
config (deploy/nginx/). A burst of predictions through nginx is shared by both, and not one fails while one
instance is stopped gracefully in the middle of it; X-Request-ID passes through nginx both ways."""

from __future__ import annotations

import itertools
import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx2 as httpx
import pytest

from tests.conftest import ROOT
from tests.deploy.harness import Instance, image_instances, nginx_binary, running_nginx, wait_until

pytestmark = pytest.mark.e2e

DIGIT = ROOT / "service" / "samples" / "digit.png"  # MNIST's first test image: a 7
DRAIN_DELAY_S = 2  # FEATUREMAP_SHUTDOWN_DELAY_S: short here; readiness is 503 while the instance still serves
CLIENTS = 4
BEFORE, AFTER = 100, 100  # answers before the SIGTERM, and after the instance has exited
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")  # nginx's $request_id


@dataclass
class Cluster:
    instances: list[Instance]
    url: str  # nginx

    def logged(self, request_id: str) -> bool:
        return any(entry.get("request_id") == request_id for i in self.instances for entry in i.access_log())


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    nginx_binary()  # fails at once, naming how to install it, when it is missing
    with image_instances(2, shutdown_delay_s=str(DRAIN_DELAY_S)) as instances:
        with running_nginx([instance.run.port for instance in instances]) as url:
            yield Cluster(instances, url)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("client-7f3a.1:x", True), (None, False), ("not a sane id", False)],
    ids=["client-id-kept", "absent-id-generated", "insane-id-replaced"],
)
def test_request_ids_pass_through_nginx(cluster: Cluster, sent: str | None, kept: bool) -> None:
    headers = {"X-Request-ID": sent} if sent else {}
    response = httpx.get(f"{cluster.url}/v1/filters", headers=headers, timeout=30)
    assert response.status_code == 200
    (request_id,) = response.headers.get_list("x-request-id")  # one id, not nginx's and the service's
    assert request_id == sent if kept else GENERATED_ID.match(request_id), request_id
    # The instance logged the same id: nginx passed it on, it did not only put it on the answer.
    wait_until(lambda: cluster.logged(request_id), 10, f"an instance to log request id {request_id}")


def test_a_burst_is_shared_and_survives_an_instance_stopping_gracefully(cluster: Cluster) -> None:
    stopping, staying = cluster.instances
    assert stopping.proc.poll() is None and staying.proc.poll() is None
    digit = DIGIT.read_bytes()
    outcomes: dict[int, tuple[int, str | None, object]] = {}  # request number: (status, echoed id, label or error)
    numbers = itertools.count()
    lock = threading.Lock()
    done = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=cluster.url, timeout=60) as http:
            while not done.is_set():
                with lock:
                    n = next(numbers)
                try:
                    files = {"image": ("digit.png", digit, "image/png")}
                    r = http.post("/v1/predict", files=files, headers={"X-Request-ID": f"burst-{n}"})
                    outcome: tuple[int, str | None, object] = (
                        r.status_code,
                        r.headers.get("x-request-id"),
                        r.json().get("label") if r.status_code == 200 else r.text[:200],
                    )
                except httpx.HTTPError as exc:
                    outcome = (0, None, repr(exc))
                with lock:
                    outcomes[n] = outcome

    def answered() -> int:
        with lock:
            return len(outcomes)

    def readiness_off() -> bool:
        try:
            r = httpx.get(f"{stopping.url}/readyz", timeout=10)
        except httpx.TransportError as exc:
            raise AssertionError(f"the instance stopped listening before its readiness was seen off: {exc!r}") from exc
        return r.status_code == 503 and r.json() == {"status": "stopping"}

    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: answered() >= BEFORE, 60, f"{BEFORE} answers through nginx")
        stopping.proc.send_signal(signal.SIGTERM)
        wait_until(readiness_off, 30, "the stopping instance's /readyz to answer 503", interval=0.01)
        assert stopping.proc.wait(60) in (0, -signal.SIGTERM)
        exited_at = answered()
        wait_until(lambda: answered() >= exited_at + AFTER, 60, f"{AFTER} answers after the instance exited")
    finally:
        done.set()
        for thread in threads:
            thread.join(90)

    failed = {n: o for n, o in outcomes.items() if o != (200, f"burst-{n}", 7)}
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed, e.g. {sorted(failed.items())[:5]}"
    log = stopping.log.read_text()
    assert "SIGTERM: not ready" in log and "Application shutdown complete" in log

    def served(instance: Instance) -> set[str]:
        return {str(e["request_id"]) for e in instance.access_log() if e["path"] == "/v1/predict" and e["status"] == 200}  # fmt: skip

    by_stopping, by_staying = served(stopping), served(staying)
    assert by_stopping and by_staying, (len(by_stopping), len(by_staying))  # nginx shared the load
    assert {f"burst-{n}" for n in outcomes} <= by_stopping | by_staying  # each reached an instance with its id
