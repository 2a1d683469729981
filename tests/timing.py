"""Waits in tests scale with how fast this machine runs a node job now, never a fixed number.

A tiny node job's cost is mostly starting Python and importing torch, which on a loaded 2-core
machine varies from seconds to tens of seconds. One probe (a subprocess doing what a node job
does: import torch and torchvision, build the model, take a few SGD steps) is timed, and every
wait is a multiple of it. DAGTRAIN_TEST_TIME_FACTOR multiplies all waits on top, for machines
whose load changes during a run.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_PROBE = """
import torch, torchvision
from node_payload.common.models import build_model
torch.set_num_threads(1)
model = build_model("smallcnn", 4, 3, seed=0)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))
for _ in range(20):
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
"""


@functools.cache
def job_seconds() -> float:
    """Seconds one tiny node job's start and work take on this machine (measured once)."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, check=True)
    return (time.monotonic() - started) * float(os.environ.get("DAGTRAIN_TEST_TIME_FACTOR", "1"))


def wait_s(floor: float, jobs: float) -> float:
    """A wait long enough for `jobs` node jobs one after another, and never below floor."""
    return max(floor, jobs * job_seconds())
