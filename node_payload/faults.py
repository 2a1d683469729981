"""Fault injection for tests and demonstrations: `[faults]` makes chosen node jobs misbehave.

`fail` pairs exit as if the data were unreachable on every attempt (so DAGMan retries and then
the node counts as missing); `hang` pairs sleep past the round deadline (so the job is removed).
`scale` triples and `nan` pairs play a bad volunteer: the node trains normally, then multiplies
its update by a factor (100: a blown-up update, -1: a sign flip) or puts a NaN in it, so that
validation and robust aggregation can be shown to keep the global model sound.
`slow` pairs play a slower machine: the node works `factor` times as long in every round, so that
synchronous and asynchronous runs can be compared on heterogeneous nodes with the same work.
`evict` triples [node, seconds, times] play a desktop whose owner keeps coming back: each of the
node's jobs is evicted `seconds` into each run, `times` times. A job cannot evict itself, so the
local runner acts on it (pipeline/local_run.py); a pool's owners, or condor_vacate_job, do there.
With `[train] checkpoint_s` the job resumes from its checkpoint each time; without, from zero.
"""

import os
import time

import torch

from node_payload.common.run_config import RunConfig
from node_payload.fetch import DataUnreachable


def inject(config: RunConfig, round_: int, node: int) -> None:
    faults = config.faults
    if (round_, node) in faults.fail:
        raise DataUnreachable(f"injected failure ([faults] fail) for round {round_} node {node}")
    if (round_, node) in faults.hang:
        time.sleep(2 * config.run.node_deadline_s + 60)


SLOWDOWN_VARIABLE = "DAGTRAIN_SLOWDOWN"


def slowdown(config: RunConfig, node: int) -> float:
    """How many times as long this node's work should take: `[faults] slow` (travels in the
    config, so it acts on a pool too) times the local runner's per-slot DAGTRAIN_SLOWDOWN."""
    factor = 1.0
    for n, f in config.faults.slow:
        if n == node:
            factor *= f
    return factor * float(os.environ.get(SLOWDOWN_VARIABLE) or 1)


def slow_down(factor: float, elapsed: float) -> None:
    """Sleep so that work which took `elapsed` seconds takes `factor` times as long."""
    if factor > 1:
        time.sleep((factor - 1) * elapsed)


def tamper(
    config: RunConfig, round_: int, node: int, update: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The update as this node would send it under `[faults] scale` and `nan`."""
    faults = config.faults
    for r, n, factor in faults.scale:
        if (r, n) == (round_, node):
            update = {
                name: t * factor if t.is_floating_point() else t for name, t in update.items()
            }
    if (round_, node) in faults.nan:
        name = next(name for name, t in update.items() if t.is_floating_point())
        update = {**update, name: update[name].clone()}
        update[name].view(-1)[0] = torch.nan
    return update
