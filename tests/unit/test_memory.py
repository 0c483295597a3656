"""The allocator's settings (`service.memory`): the buffers one feature-map request frees are reused by the next,
on a compute thread, instead of being unmapped and faulted in again. Each case runs in a fresh interpreter, since
the settings are process-wide; the untuned one is the control."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service import memory
from tests.conftest import ROOT

# Seven requests' work (a 512x512 RGB image through 16 filters -> ReLU -> pool, JSON tensors) on a thread made
# after the settings, as the compute threads are; prints the page faults each of the last five took.
SCRIPT = """
import io, resource, sys, threading
import numpy as np
if sys.argv[1] == "tuned":
    from service.memory import tune_allocator
    assert tune_allocator()
import torch
from PIL import Image
from service.api.deps import ImagePayload
from service.api.featuremaps import _featuremaps
from service.config import Settings
from service.schemas import FeaturemapsSpec

buf = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(buf, format="PNG")
conv = {"op": "conv", "filters": [{"kernel": np.ones((3, 3, 3)).tolist()}] * 16, "padding": "same"}
spec = {"color": "rgb", "layers": [conv, {"op": "relu"}, {"op": "pool", "size": 2}], "output": {"format": "json"}}
payload = ImagePayload(buf.getvalue(), FeaturemapsSpec.model_validate(spec))

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def requests(out):
    torch.set_num_threads(1)
    for i in range(9):
        before = faults()
        _featuremaps(payload, Settings(), False)
        if i >= 2:
            out.append(faults() - before)

out = []
worker = threading.Thread(target=requests, args=(out,))
worker.start()
worker.join()
print(*out)
"""
BETWEEN = 5000  # page faults a typical request: tuned below, untuned above


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator, on Linux")
@pytest.mark.parametrize("mode", ["tuned", "environment", "default"])
def test_a_request_reuses_the_memory_the_last_one_freed(mode: str) -> None:
    """Measured over requests 3 to 7, with 16 hash seeds in two virtual environments: tuned (by mallopt, or by the
    GLIBC_TUNABLES that `python -m service` gives its workers), most requests take under 20 faults, and a few up to
    about 4,900 where the heap grows past a fragment; untuned, 22,000 to 36,000 every request (each fault is a trip
    through the hypervisor on a VM). The median of requests 3 to 9 is what is tested, the typical request: a single
    request's count depends on the hash seed and the environment (CI saw 2,943 on the third, and once 37,183, with
    under 520 on each of the four after it, which failed the mean this test used to take)."""
    env = {**os.environ, "GLIBC_TUNABLES": memory.GLIBC_TUNABLES} if mode == "environment" else None
    cmd = [sys.executable, "-c", SCRIPT, mode]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    counts = [int(n) for n in run.stdout.split()]
    assert len(counts) == 7
    typical = sorted(counts)[len(counts) // 2]
    assert (typical < BETWEEN) if mode != "default" else (typical > 2 * BETWEEN), counts
