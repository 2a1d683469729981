"""The local runner's self-checkpointing and evictions, with HTCondor's semantics: a job that
exits with its checkpoint_exit_code has its transfer_checkpoint_files spooled and is restarted
in its sandbox; an evicted job (`dagtrain run --evict SLOT@SECONDS`) is logged as evicted, goes
back to the queue and starts again in a new sandbox with the spool's checkpoint."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import htcondor2
import pytest
import torch
from test_local_runner_helpers import dag, job
from timing import job_seconds

from node_payload.common.run_layout import METRICS_FILE, model_path, node_dir
from node_payload.common.tensor_io import load_tensors
from pipeline.cli import main
from pipeline.local_runner import NodeEvent, run_dag
from tests.checkpoint_training import steps_in

# Counts steps in `state` (its checkpoint): checkpoints after step 2; a job restarted from that
# checkpoint the first time waits to be evicted; the next start finishes from the checkpoint.
COUNTER = """
echo "$_CONDOR_SCRATCH_DIR" >> {starts}
step=$(cat state 2>/dev/null || echo 0)
echo "start at $step"
if [ "$step" -lt 2 ]; then echo 2 > state; exit 85; fi
if [ "$(wc -l < {starts})" -eq 2 ]; then echo 5 > state; sleep 600; fi
echo "finished from $step" > result
"""
STEPPER = """
echo "$_CONDOR_SCRATCH_DIR" >> {starts}
step=$(cat state 2>/dev/null || echo 0)
echo "start at $step"
if [ "$step" -lt 4 ]; then echo $((step + 2)) > state; exit 85; fi
echo "finished from $step" > result
"""
CHECKPOINTING = "checkpoint_exit_code = 85\ntransfer_checkpoint_files = state\n"


def _events(log: Path) -> list[int]:
    return [int(event.type) for event in htcondor2.JobEventLog(str(log)).events(0)]


def test_a_checkpoint_exit_spools_the_files_and_restarts_the_job(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    job(tmp_path, "A", STEPPER.format(starts=starts),
        submit=CHECKPOINTING + "transfer_output_files = result")  # fmt: skip
    result = run_dag(dag(tmp_path, "JOB A A.sub\n"), slots=1)
    assert result.ok
    assert (tmp_path / "result").read_text() == "finished from 4\n"
    assert len(starts.read_text().splitlines()) == 3  # the first run and two restarts
    assert (tmp_path / "A.out").read_text().splitlines() == [
        "start at 0",
        "start at 2",
        "start at 4",
    ]  # the same sandbox: the restarts see its files, their output appended
    assert _events(tmp_path / "A.log") == [0, 1, 40, 40, 40, 40, 5]  # each checkpoint spooled
    assert not list((tmp_path / ".local_runner" / "sandbox").glob("*"))  # spool dropped


def test_an_evicted_job_goes_back_to_the_queue_and_resumes_from_its_spooled_checkpoint(
    tmp_path: Path,
) -> None:
    starts = tmp_path / "starts"
    job(tmp_path, "A", COUNTER.format(starts=starts),
        submit=CHECKPOINTING + "transfer_output_files = result")  # fmt: skip
    events: list[NodeEvent] = []
    evict_at = job_seconds()  # a shell job is sleeping by then, long before its 600 s are up
    result = run_dag(dag(tmp_path, "JOB A A.sub\n"), slots=2, on_event=events.append,
                     evictions=[(1, 0.0), (0, evict_at)])  # fmt: skip
    assert result.ok
    # Not "finished from 5": what it did after its checkpoint died with the eviction.
    assert (tmp_path / "result").read_text() == "finished from 2\n"
    assert _events(tmp_path / "A.log") == [0, 1, 40, 40, 4, 1, 5]
    assert [e.kind for e in events] == ["submitted", "running", "evicted", "running", "done"]
    hosts = [
        e["ExecuteHost"] for e in htcondor2.JobEventLog(str(tmp_path / "A.log")).events(0)
        if e.type == htcondor2.JobEventType.EXECUTE
    ]  # fmt: skip
    assert hosts == ["<127.0.0.1:0?alias=slot0.local-runner>"] * 2


def test_an_evicted_job_without_a_checkpoint_starts_again(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    job(tmp_path, "A", f'echo x >> {starts}; [ "$(wc -l < {starts})" -eq 1 ] && sleep 600; '
        "echo done > result", submit="transfer_output_files = result")  # fmt: skip
    result = run_dag(dag(tmp_path, "JOB A A.sub\n"), slots=1, evictions=[(0, job_seconds())])
    assert result.ok and (tmp_path / "result").read_text() == "done\n"
    assert _events(tmp_path / "A.log") == [0, 1, 4, 1, 5]


@pytest.mark.slow
@pytest.mark.parametrize("start", ["warm", "cold"])
def test_a_run_whose_node_jobs_checkpoint_and_are_evicted_makes_the_uninterrupted_model(
    start: str, tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    """Node jobs train for seconds with a checkpoint every second; slot 0 plays a slow machine
    whose job is evicted mid-run and resumes on the next free slot from its last checkpoint."""
    # About three checkpoints a job: each restart pays for a start-up and a fetch again.
    shape = {"run__nodes": "2", "run__rounds": "1", "train__local_steps": str(steps_in(3))}
    runs = {"plain": tmp_path / "plain", "evicted": tmp_path / "evicted"}
    cold = ["--cold"] if start == "cold" else []
    config = tiny_config(**shape)
    assert main(["plan", str(config), "--out", str(runs["plain"])]) == 0
    started = time.time()
    assert main(["run", str(runs["plain"]), *cold]) == 0
    # When the plain run's first node job ended, counted from the run's start: by then the
    # evicted run's slot-0 job has written a checkpoint (it checkpoints every second of its
    # training) and is still training, since its restarts and its slowdown come on top.
    ends = [json.loads((node_dir(runs["plain"], 0, n) / METRICS_FILE).read_text()) for n in (0, 1)]
    evict_at = min(m["started_at"] + m["seconds"] for m in ends) - started
    config = tiny_config(**shape, train__checkpoint_s="1")
    assert main(["plan", str(config), "--out", str(runs["evicted"])]) == 0
    evict = ["--slow-slot", "0=4", "--evict", f"0@{evict_at:.1f}"]
    assert main(["run", str(runs["evicted"]), *cold, *evict]) == 0

    node_dirs = [node_dir(runs["evicted"], 0, node) for node in range(2)]
    written = [json.loads((d / METRICS_FILE).read_text())["checkpoints"] for d in node_dirs]
    assert all(history["written"] for history in written)  # every job checkpointed
    evictions = [t for d in node_dirs for t in _events(d / "job.log") if t == 4]
    assert len(evictions) == 1
    plain, _ = load_tensors(model_path(runs["plain"], 1))
    resumed, _ = load_tensors(model_path(runs["evicted"], 1))
    assert plain.keys() == resumed.keys()
    assert [name for name in plain if not torch.equal(plain[name], resumed[name])] == []


def test_an_evicted_job_keeps_its_maxjobs_place_while_it_waits_for_a_slot(
    tmp_path: Path,
) -> None:
    order, starts = tmp_path / "order", tmp_path / "starts"
    job(tmp_path, "A", f'echo x >> {starts}; [ "$(wc -l < {starts})" -eq 1 ] && sleep 600; '
        f"echo A >> {order}")  # fmt: skip
    job(tmp_path, "B", f"echo B >> {order}")
    job(tmp_path, "C", "true")
    text = (
        "JOB A A.sub\nJOB B B.sub\nJOB C C.sub\nPARENT C CHILD B\n"
        "CATEGORY A train\nCATEGORY B train\nMAXJOBS train 1\nPRIORITY B 10\n"
    )
    # A takes slot 0 and the category's one place; C runs beside it, then B, which ranks
    # higher, waits for that place. A's eviction frees a slot, not the place.
    result = run_dag(dag(tmp_path, text), slots=2, evictions=[(0, job_seconds())])
    assert result.ok
    assert _events(tmp_path / "A.log") == [0, 1, 4, 1, 5]
    assert order.read_text().splitlines() == ["A", "B"]
