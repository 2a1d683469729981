"""Planned runs on the personal HTCondor pool: the generated DAG runs there unchanged, and the
local runner is a faithful stand-in (same model bytes, same quorum and rescue behaviour)."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from node_payload.common.run_config import read_run_config
from node_payload.common.run_layout import (
    CONFIG_FILE,
    DAG_FILE,
    REPORT_FILE,
    make_node_dirs,
    model_path,
)
from node_payload.common.tensor_io import load_tensors
from pipeline import config as config_mod
from pipeline import planner
from pipeline.local_run import embedded_mirrors, run_local
from pipeline.local_runner import run_dag
from pipeline.local_runner.dag_file import Node, parse_dag
from pipeline.local_runner.job_process import THREAD_VARIABLES
from pipeline.rescue import reopen_missing_nodes
from pipeline.run_status import job_history
from tests.condor_pool.pool import CondorPool
from tests.test_tensorboard_log import scalars
from tests.timing import wait_s

pytestmark = pytest.mark.pool


def _deadline_s() -> int:
    """Short enough to keep the tests quick, long enough for a healthy tiny node job to finish,
    from its queueing (4 nodes on the pool's slots: two jobs one after the other, and more)."""
    return round(wait_s(20, 4))


def _plan(config_path: Path, run_dir: Path) -> Path:
    return planner.write(planner.make_plan(config_mod.load(config_path)), run_dir)


@contextmanager
def _mirrors(run_dir: Path) -> Iterator[None]:
    """The run's embedded mirrors, on the ports its config.toml names (as `dagtrain run` does)."""
    with embedded_mirrors(run_dir, read_run_config(run_dir / CONFIG_FILE)):
        yield


def _submit(pool: CondorPool, run_dir: Path) -> int:
    """condor_submit_dag dagtrain.dag from the run directory; returns DAGMan's exit status."""
    pool.own(run_dir)
    dag = run_dir / DAG_FILE
    pool.submit_dag(dag)
    return pool.wait_dag(dag, wait_s(240, 40))


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / REPORT_FILE).read_text())


def _round(run_dir: Path, round_: int) -> dict:
    return json.loads((run_dir / f"rounds/r{round_:03d}/round.json").read_text())


def _max_abs_difference(a: Path, b: Path) -> float:
    first, _ = load_tensors(a)
    second, _ = load_tensors(b)
    assert first.keys() == second.keys()
    return max((first[name].double() - second[name].double()).abs().max().item() for name in first)


def _executions(job_log: Path) -> int:
    """How many times a job started, from the execute (001) events of its user log."""
    return len(re.findall(r"^001 ", job_log.read_text(), re.MULTILINE))


@pytest.mark.slow
def test_pool_run_matches_local_runner(
    condor_pool: CondorPool,
    condor_workdir: Path,
    tiny_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    pool_run = _plan(tiny_config(), condor_workdir / "run")
    local_run = shutil.copytree(pool_run, tmp_path / "local-run")

    started = time.monotonic()
    with _mirrors(pool_run):
        status = _submit(condor_pool, pool_run)
    pool_seconds = time.monotonic() - started
    assert status == 0, (pool_run / f"{DAG_FILE}.dagman.out").read_text()[-3000:]
    report = _report(pool_run)
    assert report["status"] == "completed" and report["rounds_completed"] == 2
    assert [r["nodes_used"] for r in report["rounds"]] == [3, 3]
    assert model_path(pool_run, 2).stat().st_size > 0

    started = time.monotonic()
    local_report = run_local(local_run, slots=3, show_progress=False)
    local_seconds = time.monotonic() - started
    assert local_report["status"] == "completed"

    # Both ran each node job on one thread: the slot's RequestCpus, read from the job ad.
    for run_dir in (pool_run, local_run):
        for metrics in run_dir.glob("rounds/*/*/metrics.json"):
            assert json.loads(metrics.read_text())["threads"] == 1, metrics
    difference = _max_abs_difference(model_path(pool_run, 2), model_path(local_run, 2))
    print(
        f"\npool run {pool_seconds:.1f} s, local runner {local_seconds:.1f} s, "
        f"max abs weight difference {difference}"
    )
    assert difference == 0.0
    # Not only the final weights: every update and model file is the same, byte for byte.
    for relative in _tensor_files(pool_run):
        assert (pool_run / relative).read_bytes() == (local_run / relative).read_bytes(), relative
    # The aggregation jobs wrote the same TensorBoard points into the run directory on both.
    pool_board, local_board = scalars(pool_run), scalars(local_run)
    assert pool_board.keys() == local_board.keys() and "heldout/image_accuracy" in pool_board
    for tag in ("heldout/accuracy", "heldout/loss", "updates/nodes_used", "updates/bytes"):
        assert pool_board[tag] == local_board[tag] and len(pool_board[tag]) == 2, tag


def _tensor_files(run_dir: Path) -> list[Path]:
    """Models, server states and updates; the held-out cache is fetched data, not results."""
    found = [*run_dir.glob("models/*.safetensors"), *run_dir.glob("rounds/*/*/update.safetensors")]
    return sorted(path.relative_to(run_dir) for path in found)


@pytest.mark.slow
def test_pool_round_goes_on_at_quorum_without_failed_and_removed_nodes(
    condor_pool: CondorPool, condor_workdir: Path, tiny_config: Callable[..., Path]
) -> None:
    """Node 1 fails every try, node 2 hangs until periodic_remove: 2 of 4 updates meet 0.5."""
    config = tiny_config(
        run__nodes="4",
        run__rounds="1",
        run__quorum="0.5",
        run__retries="1",
        run__node_deadline_s=str(_deadline_s()),
        faults__fail="[[0, 1]]",
        faults__hang="[[0, 2]]",
    )
    run_dir = _plan(config, condor_workdir / "run")
    with _mirrors(run_dir):
        assert _submit(condor_pool, run_dir) == 0
    round_ = _round(run_dir, 0)
    assert round_["nodes_used"] == 2 and round_["nodes_missing"] == [1, 2]
    assert _report(run_dir)["status"] == "completed"
    nodes = run_dir / "rounds/r000"
    assert (nodes / "n001/MISSING").read_text() == "failed 2 times, last exit code 75\n"
    assert "removed" in (nodes / "n002/MISSING").read_text()
    assert _executions(nodes / "n001/job.log") == 2
    assert "PeriodicRemove expression" in (nodes / "n002/job.log").read_text()
    # A failed job's output comes back as the local runner's does: the POST script points there.
    assert (
        "injected failure ([faults] fail) for round 0 node 1"
        in (nodes / "n001/job.err").read_text()
    )


@pytest.mark.slow
def test_pool_below_quorum_stops_and_rescue_reruns_only_missing_nodes(
    condor_pool: CondorPool, condor_workdir: Path, tiny_config: Callable[..., Path]
) -> None:
    config = tiny_config(
        run__quorum="1.0",
        run__retries="1",
        run__node_deadline_s=str(_deadline_s()),
        faults__fail="[[0, 1]]",
        faults__hang="[[0, 2]]",
    )
    run_dir = _plan(config, condor_workdir / "run")
    with _mirrors(run_dir):
        assert _submit(condor_pool, run_dir) != 0
        report = _report(run_dir)
        assert report["status"] == "failed" and report["rounds_completed"] == 0
        assert (run_dir / f"{DAG_FILE}.rescue001").is_file()
        assert "quorum needs 3" in (run_dir / "rounds/r000/aggregate.err").read_text()
        finished = run_dir / "rounds/r000/n000"
        metrics = (finished / "metrics.json").read_bytes()

        # Fix the cause, give the missing nodes another chance, and submit the same DAG again:
        # DAGMan itself picks up the rescue DAG.
        resolved = run_dir / CONFIG_FILE
        text = resolved.read_text()
        resolved.write_text(re.sub(r"(?m)^(fail|hang) = .*$", r"\1 = []", text))
        assert reopen_missing_nodes(run_dir) == ["train_r000_n001", "train_r000_n002"]
        assert _submit(condor_pool, run_dir) == 0

    report = _report(run_dir)
    assert report["status"] == "completed" and report["rounds_completed"] == 2
    assert [r["nodes_used"] for r in report["rounds"]] == [3, 3]
    assert (finished / "metrics.json").read_bytes() == metrics
    assert _executions(finished / "job.log") == 1
    assert _executions(run_dir / "rounds/r000/n001/job.log") == 3  # 2 failed tries, then 1
    # Its retries are counted across both DAGMan submissions, not from the newest one only.
    assert job_history(run_dir / "rounds/r000/n001/job.log").retries == 2


@pytest.mark.slow
def test_pool_runs_an_asynchronous_dag(
    condor_pool: CondorPool, condor_workdir: Path, tiny_config: Callable[..., Path]
) -> None:
    """Lanes on the pool: DAGMan runs the PRE scripts (claims, PRE_SKIP past the budget) and the
    concurrent POST scripts (applies under the lock); every update lands exactly once, and each
    lane's compression residual stays in the execute machine's cache for its next job."""
    config = tiny_config(
        run__mode='"async"',
        async__updates="6",
        faults__fail="[[0, 1]]",
        compression__method='"dgc"',
    )
    run_dir = _plan(config, condor_workdir / "run")
    with _mirrors(run_dir):
        status = _submit(condor_pool, run_dir)
    assert status == 0, (run_dir / f"{DAG_FILE}.dagman.out").read_text()[-3000:]
    report = _report(run_dir)
    assert report["status"] == "completed" and report["updates_accepted"] == 6
    ledger = json.loads((run_dir / "async/state.json").read_text())
    applied = [u for v in ledger["versions"] for u in v["updates"]]
    assert len(applied) == len(set(applied)) == 6 == ledger["version"]
    # Lane 1's first job failed all its tries; its lane went on with the next job.
    assert report["jobs_failed"] == {"1:0": "failed 3 times, last exit code 75"}
    assert "lane 1 step 0: failed 3 times" in (run_dir / "async/events.log").read_text()
    assert model_path(run_dir, 6).stat().st_size > 0
    # Lanes 0 and 2 never failed: the residual counts each job they ran (a job skipped while the
    # budget was spoken for runs nothing; a later one may run once lane 1 gave its share back).
    for lane in ("l000", "l002"):
        ran = sorted(run_dir.glob(f"lanes/{lane}/j*/metrics.json"))
        assert [json.loads(m.read_text())["residual_jobs"] for m in ran] == list(
            range(1, len(ran) + 1)
        )


def test_dagman_and_condor_submit_accept_the_generated_files(
    condor_pool: CondorPool, condor_workdir: Path, tiny_config: Callable[..., Path]
) -> None:
    """condor_submit_dag -no_submit takes the DAG; each submit file, with its node's VARS as
    DAGMan would pass them, gives the job ad the planner meant (condor_submit -dry-run)."""
    run_dir = _plan(tiny_config(), condor_workdir / "run")
    condor_pool.own(run_dir)
    proc = condor_pool.run(["condor_submit_dag", "-no_submit", DAG_FILE], cwd=run_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (run_dir / f"{DAG_FILE}.condor.sub").is_file()

    dag = parse_dag(run_dir / DAG_FILE)
    # condor_submit needs a job's initialdir: round 0's aggregation makes round 1's folders
    assert not (run_dir / "rounds/r001").exists()
    make_node_dirs(run_dir, 1, read_run_config(run_dir / CONFIG_FILE).run.nodes)
    node = _dry_run(condor_pool, dag.nodes["train_r001_n002"], RETRY="1")
    assert node["Iwd"] == str(run_dir / "rounds/r001/n002")
    # The embedded mirrors serve the run's models: the job gets the model's pointer.
    assert "../../../models/global_r001.json" in node["TransferInput"]
    assert "--round 1 --node 2" in node["Arguments"] and "--attempt 1" in node["Arguments"]
    assert node["RequestCpus"] == "1" and node["JobMaxRetries"] == "0"
    assert (
        f"> {read_run_config(run_dir / CONFIG_FILE).run.node_deadline_s}"
        in (node["PeriodicRemove"])
    )
    aggregate = _dry_run(condor_pool, dag.nodes["aggregate_r001"])
    assert aggregate["JobUniverse"] == "12" and "--round 1" in aggregate["Arguments"]
    report = _dry_run(condor_pool, dag.nodes["report"], DAG_STATUS="2")
    assert "--dag-status 2" in report["Arguments"]


def _dry_run(pool: CondorPool, node: Node, **dagman_macros: str) -> dict[str, str]:
    """The job ad condor_submit would queue for a DAG node (values as unparsed expressions).

    DAGMan defines its own macros ($(RETRY), $(DAG_STATUS)) beside the node's VARS.
    """
    macros = {**dagman_macros, **node.vars}
    appended = [arg for name, value in macros.items() for arg in ("-a", f"{name} = {value}")]
    submit = node.submit_file.relative_to(node.directory)
    proc = pool.run(["condor_submit", "-dry-run", "-", *appended, str(submit)], cwd=node.directory)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.findall(r"^(\w+)\s*=\s*(.*)$", proc.stdout, re.MULTILINE)
    return {name: value.strip('"') for name, value in found}


# What a job sees of its starter, as facts that do not depend on the machine's paths.
ENVIRONMENT_PROBE = """#!/bin/sh
exec > "$1"
for name in {}; do eval "echo $name=\\${{$name-unset}}"; done
[ "$TMPDIR" = "$_CONDOR_SCRATCH_DIR" ] && [ "$TMP" = "$TMPDIR" ] && [ "$TEMP" = "$TMPDIR" ] &&
    echo "temporary files: scratch"
[ "$(pwd)" = "$_CONDOR_SCRATCH_DIR" ] && echo "cwd: scratch"
[ "$(pwd)" = "$_CONDOR_JOB_IWD" ] && echo "cwd: initialdir"
[ "$_CONDOR_JOB_AD" = "$_CONDOR_SCRATCH_DIR/.job.ad" ] && [ -f "$_CONDOR_JOB_AD" ] &&
    echo "job ad: scratch"
echo "BATCH_SYSTEM=$BATCH_SYSTEM"
""".format(" ".join(THREAD_VARIABLES))


def test_job_environment_matches_local_runner(
    condor_pool: CondorPool, condor_workdir: Path, tmp_path: Path
) -> None:
    """Threads and temporary files: what node and aggregation jobs rely on, on both."""
    probe = condor_workdir / "probe.sh"
    probe.write_text(ENVIRONMENT_PROBE)
    probe.chmod(0o755)
    common = "executable = probe.sh\nlog = $(JOB).log\n"
    # request_cpus only for the vanilla job: a local-universe job asking for 2 never starts.
    (condor_workdir / "vanilla.sub").write_text(
        f"{common}request_cpus = 2\narguments = vanilla.txt\nshould_transfer_files = YES\n"
        "when_to_transfer_output = ON_EXIT\ntransfer_output_files = vanilla.txt\nqueue\n"
    )
    (condor_workdir / "local.sub").write_text(
        f"universe = local\n{common}arguments = local.txt\nqueue\n"
    )
    dag = condor_workdir / "probe.dag"
    dag.write_text("JOB vanilla vanilla.sub\nJOB local local.sub\n")
    local = shutil.copytree(condor_workdir, tmp_path / "local")

    condor_pool.own(condor_workdir)
    condor_pool.submit_dag(dag)
    assert condor_pool.wait_dag(dag, wait_s(120, 10)) == 0
    assert run_dag(local / dag.name, slots=2).ok
    for name in ("vanilla.txt", "local.txt"):
        assert (local / name).read_text() == (condor_workdir / name).read_text(), name
    assert "OMP_NUM_THREADS=2" in (local / "vanilla.txt").read_text()
    assert "OMP_NUM_THREADS=unset" in (local / "local.txt").read_text()
