"""`python -m service`: serve the app with uvicorn, configured for this service (what `make run` and the
container run). Timeouts and limits here are the server's half of "hard to break"; see the README."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import uvicorn

from service.cpus import CPU_CLAIMS_ENV, READY_DIR_ENV, default_workers
from service.memory import GLIBC_TUNABLES
from service.serving import HttpToolsNoDelayProtocol

LOG_CONFIG = Path(__file__).with_name("logging.json")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--workers",
        type=_at_least_one,
        default=os.environ.get("WEB_CONCURRENCY") or str(default_workers()),  # a string: argparse checks it too
        help="server processes (default: $WEB_CONCURRENCY, else one per usable CPU, at most 4)",
    )
    args = p.parse_args(argv)
    os.environ["WEB_CONCURRENCY"] = str(args.workers)  # each worker sizes its torch threads by it (service.cpus)
    os.environ.setdefault("GLIBC_TUNABLES", GLIBC_TUNABLES)  # workers reuse large buffers (service.memory)
    for name in (READY_DIR_ENV, CPU_CLAIMS_ENV):
        os.environ.pop(name, None)  # only ever the ones made here, for these workers
    shared = tempfile.mkdtemp(prefix="featuremap-workers-") if args.workers > 1 else None
    if shared:
        # Workers mark themselves ready here, so that /readyz answers 200 only once all of them are (Readiness),
        # and share their metrics through files, so that /metrics reports the whole server (Metrics).
        # And claim a CPU each, where each can have one (service.cpus.pin_worker).
        for name, env in (("ready", READY_DIR_ENV), ("cpus", CPU_CLAIMS_ENV)):
            os.makedirs(os.path.join(shared, name))
            os.environ[env] = os.path.join(shared, name)
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            os.makedirs(os.path.join(shared, "metrics"))
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(shared, "metrics")
    try:
        serve(args)
    finally:
        if shared:
            shutil.rmtree(shared, ignore_errors=True)


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (--workers or WEB_CONCURRENCY)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} workers: at least 1 (from --workers or WEB_CONCURRENCY)")
    return value


def serve(args: argparse.Namespace) -> None:
    uvicorn.run(
        "service.main:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        http=HttpToolsNoDelayProtocol,  # httptools, Nagle off on every connection, the head bounded at 16 KiB
        loop="service.serving:FairAcceptEventLoop",  # workers take turns at bursts of new connections
        log_config=json.loads(LOG_CONFIG.read_text()),  # one JSON line per event
        access_log=False,  # the app logs each request itself, with its id, route and duration
        timeout_keep_alive=5,  # idle keep-alive connections are closed after 5 s
        timeout_graceful_shutdown=30,  # in-flight requests get 30 s to finish after SIGTERM's delay
        limit_concurrency=1024,  # past this many connections and tasks, new requests get 503 at once
        backlog=2048,
    )


if __name__ == "__main__":
    main()
