"""Readiness across worker processes: a worker is ready only once every worker is (any may answer a probe)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from service.readiness import Readiness


def test_one_process_is_ready_on_its_own() -> None:
    readiness = Readiness()
    assert not readiness.ready and readiness.state == "starting"
    readiness.mark_ready()
    assert readiness.ready and readiness.state == "ok"
    readiness.mark_stopping()
    assert not readiness.ready and readiness.state == "stopping"


def test_a_worker_waits_for_its_peers_and_dead_ones_do_not_count(tmp_path: Path) -> None:
    readiness = Readiness(tmp_path, workers=2)
    readiness.mark_ready()
    assert (tmp_path / str(os.getpid())).exists()
    assert not readiness.ready and readiness.state == "starting"  # its peer is still warming up

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ended.stdout.strip()).touch()  # a worker that was killed after marking itself ready
    (tmp_path / "notes.txt").touch()  # not a worker's mark
    assert not readiness.ready

    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as peer:
        try:
            (tmp_path / str(peer.pid)).touch()
            assert readiness.ready and readiness.state == "ok"
        finally:
            peer.kill()
    peer.wait()
    assert not readiness.ready  # the peer is gone

    readiness.mark_stopping()
    assert not (tmp_path / str(os.getpid())).exists() and readiness.state == "stopping"


def test_a_vanished_directory_means_not_ready(tmp_path: Path) -> None:
    """The server removes the directory as it ends: a late probe says not ready instead of failing."""
    peers = tmp_path / "ready"
    peers.mkdir()
    readiness = Readiness(peers, workers=1)
    readiness.mark_ready()
    assert readiness.ready
    shutil.rmtree(peers)
    assert not readiness.ready and readiness.state == "starting"
