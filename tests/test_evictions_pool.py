"""Self-checkpointing on the real pool: a node job vacated (condor_vacate_job) in the middle of
its training goes back to the queue, gets its spooled checkpoint on the next slot and resumes;
the round completes and the model is the uninterrupted run's, bit for bit."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import htcondor2
import pytest
import torch

from node_payload.common.run_layout import DAG_FILE, model_path, node_dir
from node_payload.common.tensor_io import load_tensors
from pipeline.local_run import run_local
from tests.checkpoint_training import steps_in
from tests.condor_pool.pool import CondorPool
from tests.test_pool_end_to_end import _mirrors, _plan, _report
from tests.timing import wait_s

pytestmark = pytest.mark.pool


def _wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen after {timeout_s:.0f} s: {what}")
        time.sleep(0.2)


def _event_types(job_log: Path) -> list[int]:
    return [int(event.type) for event in htcondor2.JobEventLog(str(job_log)).events(0)]


@pytest.mark.slow
def test_a_vacated_node_job_resumes_from_its_checkpoint_and_the_model_is_unchanged(
    condor_pool: CondorPool,
    condor_workdir: Path,
    tiny_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    # About four checkpoints a job: each restart pays for a start-up and a fetch again.
    shape = {"run__nodes": "2", "run__rounds": "1", "train__local_steps": str(steps_in(4))}
    run_dir = _plan(
        tiny_config(**shape, train__checkpoint_s="1", run__node_deadline_s="3600"),
        condor_workdir / "run",
    )
    node = node_dir(run_dir, 0, 0)
    with _mirrors(run_dir):
        condor_pool.own(run_dir)
        condor_pool.submit_dag(run_dir / DAG_FILE)
        # Mid-training: the job has checkpointed, been restarted by HTCondor and resumed.
        stderr = node / "job.err"
        _wait_for(lambda: stderr.is_file() and "resumed from checkpoint" in stderr.read_text(),
                  wait_s(120, 20), f"a resumed checkpoint in {stderr}")  # fmt: skip
        cluster = re.search(r"^000 \((\d+)\.", (node / "job.log").read_text(), re.MULTILINE)
        assert cluster is not None
        vacated = condor_pool.run(["condor_vacate_job", f"{cluster.group(1)}.0"], cwd=run_dir)
        assert vacated.returncode == 0, vacated.stderr
        status = condor_pool.wait_dag(run_dir / DAG_FILE, wait_s(240, 40))
    assert status == 0, (run_dir / f"{DAG_FILE}.dagman.out").read_text()[-3000:]
    assert _report(run_dir)["status"] == "completed"
    events = _event_types(node / "job.log")
    assert events.count(4) == 1 and events[-1] == 5, events  # evicted once, then finished
    resumed = (node / "job.err").read_text()
    assert "checkpoint not loaded" not in resumed

    plain = _plan(tiny_config(**shape), tmp_path / "plain")
    assert run_local(plain, slots=2, show_progress=False)["status"] == "completed"
    pool_model, _ = load_tensors(model_path(run_dir, 1))
    plain_model, _ = load_tensors(model_path(plain, 1))
    assert pool_model.keys() == plain_model.keys()
    assert [k for k in pool_model if not torch.equal(pool_model[k], plain_model[k])] == []
    shutil.rmtree(plain)
