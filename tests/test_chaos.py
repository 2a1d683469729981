"""Chaos: node jobs, a mirror and the runners killed at seeded random moments while a
synchronous and an asynchronous run go on; resumed, both end with an uninterrupted run's models.

What makes them byte-identical:
- every node job trains from fixed seeds per (round, node) or (lane, step), so a retried job (a
  SIGKILL is $RETURN -9: retried by the POST scripts like a failure) returns the same bytes;
  blocks are sha256-verified, so which mirror served them does not matter;
- synchronous: the aggregation merges a round's updates in node order, so the order in which
  jobs ran or were retried does not matter (`--slots 2`, jobs at once);
- asynchronous: the models depend on the order updates are applied and on the version each job
  was given, which timing decides when PRE scripts, jobs and POST scripts overlap: two
  uninterrupted runs on `--slots 1` already differ. Only a serial run (`dagtrain run
  --serial`) fixes them: one node at a time, the next one chosen from the DAG and its finished
  nodes alone (pipeline/local_runner/serial_order.py), so a retried job keeps its turn and a
  resumed runner takes the uninterrupted path. That is the property asserted here; DAGMan on a
  pool makes no such promise.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline import config as config_mod
from pipeline import planner
from pipeline.mirrors import free_ports
from tests.chaos import ChaosRun, ExternalMirror, Kill, drive, landed_job_kills, plan_kills
from tests.timing import job_seconds, wait_s

SEED = 9  # the issue this test answers
# Fresh processes: the kills are timed from a fresh job's measured length (tests/timing.py), and
# a warm job can end before its kill; test_local_runner_warm.py kills warm jobs and servers.
OPTIONS = {"sync": ["--slots", "2", "--cold"], "async": ["--slots", "1", "--serial", "--cold"]}


@pytest.fixture
def mirrors(tiny_dataset: Path) -> Iterator[list[ExternalMirror]]:
    """Two `dagtrain serve` processes, killed at teardown if the test did not."""
    started = [ExternalMirror(tiny_dataset, port) for port in free_ports(2)]
    yield started
    for mirror in started:
        mirror.kill()


def _plan(tiny_config: Callable[..., Path], out: Path, mode: str, urls: list[str]) -> Path:
    quoted = ", ".join(f'"{url}"' for url in urls)
    path = tiny_config(run__mode=f'"{mode}"', data__mirrors=f"[{quoted}]")
    return planner.write(planner.make_plan(config_mod.load(path)), out)


def _models(run_dir: Path) -> dict[str, str]:
    """Every global model file (each round's, each asynchronous version) and its sha256."""
    models = sorted((run_dir / "models").glob("global_r*"))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in models}


@pytest.mark.slow
def test_killed_jobs_mirror_and_runners_end_with_the_uninterrupted_models(
    tiny_config: Callable[..., Path], tmp_path: Path, mirrors: list[ExternalMirror]
) -> None:
    began = time.monotonic()
    urls = [mirror.url for mirror in mirrors]
    plans = {
        (mode, role): _plan(tiny_config, tmp_path / f"{mode}_{role}", mode, urls)
        for mode in OPTIONS
        for role in ("reference", "chaos")
    }
    references = {mode: ChaosRun(plans[mode, "reference"], OPTIONS[mode], []) for mode in OPTIONS}
    drive(list(references.values()), wait_s(300, 60))
    assert all(run.runner and run.runner.returncode == 0 for run in references.values())

    rng = random.Random(SEED)
    kills = {mode: plan_kills(rng, ["job", "job", "runner"], range(1, 6)) for mode in OPTIONS}
    chaos = {mode: ChaosRun(plans[mode, "chaos"], OPTIONS[mode], kills[mode]) for mode in OPTIONS}
    mirror_kill = Kill("mirror", rng.randrange(2, 8), rng.uniform(0.2, 0.8) * job_seconds())
    drive(list(chaos.values()), wait_s(300, 60), (mirror_kill, mirrors[rng.randrange(2)]))

    print(f"\nchaos (seed {SEED}, a job takes {job_seconds():.1f} s here):")
    for mode, run in chaos.items():
        reference = references[mode]
        identical = _models(run.run_dir) == _models(reference.run_dir)
        print(
            f"  {mode}: {landed_job_kills(run.run_dir)} of 2 node job kills landed, "
            f"{run.runner_kills} runner kill(s), {len(run.starts)} job starts (uninterrupted: "
            f"{len(reference.starts)}), {len(_models(run.run_dir))} models, identical: {identical}"
        )
    print(f"  mirror killed: {mirror_kill.landed}; {time.monotonic() - began:.0f} s in all")
    for mode, run in chaos.items():
        assert run.runner is not None and run.runner.returncode == 0, mode
        assert run.runner_kills == 1 and landed_job_kills(run.run_dir) >= 1, mode
        assert _models(run.run_dir) == _models(references[mode].run_dir), mode
    assert mirror_kill.landed
