"""Asynchronous mode: lanes, the PRE script's claim, the POST script's staleness-weighted apply
under a lock, the buffered variant, budgets, bad updates, failed lanes and resuming."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from aggregation.async_apply import arrive, flush
from aggregation.async_claim import EXIT_SKIP, POINTER_INPUT, claim
from aggregation.async_state import lane_length, read_ledger, write_ledger
from aggregation.staleness import staleness_weight
from node_payload.common.errors import EXIT_FATAL, UserError
from node_payload.common.run_config import RunConfig, read_run_config
from node_payload.common.run_layout import (
    ASYNC_EVENTS,
    CONFIG_FILE,
    DAG_FILE,
    UPDATE_FILE,
    lane_job_dir,
    model_path,
    model_pointer_path,
)
from node_payload.common.tensor_io import load_tensors, save_tensors, update_metadata
from pipeline import config as config_mod
from pipeline import planner
from pipeline.local_runner.dag_file import parse_dag
from pipeline.local_runner.submit_description import load_job
from pipeline.run_status import read_status, render
from pipeline.submission import check_run_dir
from tests.test_tensorboard_log import scalars
from tests.timing import wait_s

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def async_run(tiny_config: Callable[..., Path], tmp_path: Path) -> Callable[..., Path]:
    """Plans an asynchronous tiny run (3 lanes); keyword overrides as for tiny_config."""

    def plan(**overrides: str) -> Path:
        path = tiny_config(run__mode='"async"', **overrides)
        return planner.write(planner.make_plan(config_mod.load(path)), tmp_path / "run")

    return plan


def _config(run_dir: Path) -> dict:
    return read_run_config(run_dir / CONFIG_FILE)


def _write_update(
    run_dir: Path, lane: int, step: int, base: int, delta: float = 0.01, samples: int = 48
) -> dict[str, torch.Tensor]:
    """The update a job of this lane would return after training from version `base`."""
    model, _ = load_tensors(model_path(run_dir, base))
    update = {
        name: torch.full_like(t, delta) if t.is_floating_point() else t.clone()
        for name, t in model.items()
    }
    save_tensors(
        lane_job_dir(run_dir, lane, step) / UPDATE_FILE,
        update,
        update_metadata(step, lane, samples, base),
    )
    return update


def _events(run_dir: Path) -> str:
    return (run_dir / ASYNC_EVENTS).read_text()


@pytest.mark.parametrize(
    ("rule", "staleness", "weight"),
    [
        ("constant", 7, 1.0),
        ("polynomial", 0, 1.0),
        ("polynomial", 3, 0.5),  # (1 + 3) ** -0.5
        ("hinge", 4, 1.0),
        ("hinge", 6, 0.5),  # 1 / (0.5 * (6 - 4) + 1)
    ],
)
def test_staleness_rules(rule: str, staleness: int, weight: float) -> None:
    assert staleness_weight(rule, staleness, 0.5, 4) == pytest.approx(weight)


def test_lane_length_lets_fast_lanes_take_more_than_their_share() -> None:
    config = RunConfig().with_values("run", nodes=4, rounds=6)
    assert lane_length(config) == 24  # 4 x (24 / 4), at most the budget
    config = config.with_values("async", updates=1000)
    assert lane_length(config) == 1000
    config = config.with_values("run", nodes=100)
    assert lane_length(config) == 40
    config = config.with_values("async", lane_jobs=7)
    assert lane_length(config) == 7


def test_schedule_spans_the_versions_of_the_budget() -> None:
    config = RunConfig().with_values("run", mode="async", nodes=4, rounds=6)
    config = config.with_values("async", buffer=4)
    assert config.schedule_length == 6
    config = config.with_values("run", mode="sync")
    assert config.schedule_length == 6


def test_planned_dag_chains_lanes_and_skips_past_the_budget(async_run: Callable) -> None:
    run_dir = async_run(async__updates="5")
    dag = parse_dag(run_dir / DAG_FILE)
    lanes = read_run_config(run_dir / CONFIG_FILE).run.nodes
    jobs = [name for name in dag.nodes if name.startswith("train_")]
    assert len(jobs) == lanes * 5 and dag.final is not None
    node = dag.nodes["train_l001_j0003"]
    assert node.pre_skip == EXIT_SKIP and node.retries == 2
    assert node.parents == {"train_l001_j0002"}
    assert "--lane 1 --step 3" in " ".join(node.pre.args)
    job = load_job(node.submit_file, node.directory, node.vars, 1)
    assert job.initialdir == lane_job_dir(run_dir, 1, 3)
    assert POINTER_INPUT in job.transfer_input_files[-1]  # embedded mirrors serve the model
    assert "--round 3 --node 1" in " ".join(job.arguments)
    assert read_ledger(run_dir).version == 0 and not (run_dir / "rounds").exists()


def test_claim_hands_the_newest_model_and_records_it(async_run: Callable) -> None:
    run_dir = async_run()
    assert claim(run_dir, _config(run_dir), 2, 0) == 0
    given = lane_job_dir(run_dir, 2, 0) / POINTER_INPUT
    assert given.read_bytes() == model_pointer_path(run_dir, 0).read_bytes()
    ledger = read_ledger(run_dir)
    assert ledger.claims["2:0"]["version"] == 0 and ledger.started_at is not None


def test_claims_stop_at_the_update_budget_and_after_the_time_budget(
    async_run: Callable,
) -> None:
    run_dir = async_run(async__updates="2")
    config = _config(run_dir)
    assert claim(run_dir, config, 0, 0) == 0
    assert claim(run_dir, config, 1, 0) == 0
    assert claim(run_dir, config, 2, 0) == EXIT_SKIP  # two updates in flight: spoken for
    assert claim(run_dir, config, 0, 0) == 0  # a retry keeps its own claim

    ledger = read_ledger(run_dir)
    ledger.claims.clear()
    ledger.started_at -= 10
    write_ledger(run_dir, ledger)
    config = config.with_values("async", time_budget_s=5)
    assert claim(run_dir, config, 2, 0) == EXIT_SKIP


@pytest.mark.parametrize("mixing", ["constant", "cosine"])
def test_arrivals_are_applied_at_once_weighted_by_staleness(
    async_run: Callable, mixing: str
) -> None:
    run_dir = async_run(server__lr="1.0", async__mixing_schedule=f'"{mixing}"')
    config = _config(run_dir)
    for lane in (0, 1):
        claim(run_dir, config, lane, 0)
    _write_update(run_dir, 0, 0, base=0, delta=0.01)
    _write_update(run_dir, 1, 0, base=0, delta=0.02)
    assert arrive(run_dir, config, 0, 0, 0, 0, 2) == 0
    assert arrive(run_dir, config, 1, 0, 0, 0, 2) == 0

    ledger = read_ledger(run_dir)
    assert ledger.version == 2 and ledger.accepted == 2
    assert [v["staleness"] for v in ledger.versions] == [[0], [1]]
    v0, _ = load_tensors(model_path(run_dir, 0))
    v2, meta = load_tensors(model_path(run_dir, 2))
    assert meta["version"] == "2"
    weight = staleness_weight("polynomial", 1, 0.5, 4)
    name = "classifier.weight" if "classifier.weight" in v0 else next(iter(v0))
    # With the cosine mixing schedule the second version's step is already a little shorter.
    decay = 0.5 * (1 + math.cos(math.pi / config.schedule_length)) if mixing == "cosine" else 1
    expected = v0[name] - 0.01 - weight * 0.02 * decay
    assert torch.allclose(v2[name], expected, atol=1e-6)
    assert "lane 1 step 0: accepted, staleness 1, weight 0.707; applied as version 2" in _events(
        run_dir
    )


def test_buffered_mode_steps_every_k_arrivals_and_flushes_the_rest(
    async_run: Callable,
) -> None:
    run_dir = async_run(async__buffer="2", async__updates="3")
    config = _config(run_dir)
    for lane in range(3):
        claim(run_dir, config, lane, 0)
        _write_update(run_dir, lane, 0, base=0)
    arrive(run_dir, config, 0, 0, 0, 0, 2)
    assert read_ledger(run_dir).version == 0
    arrive(run_dir, config, 1, 0, 0, 0, 2)
    assert read_ledger(run_dir).version == 1
    arrive(run_dir, config, 2, 0, 0, 0, 2)  # the budget's last update: applied at once
    ledger = read_ledger(run_dir)
    assert ledger.version == 2 and ledger.versions[-1]["updates"] == ["2:0"]
    flush(run_dir, config)
    assert read_ledger(run_dir).version == 2


def test_concurrent_arrivals_lose_no_update(async_run: Callable) -> None:
    """Four POST scripts at once, as DAGMan runs them: the lock serializes them."""
    run_dir = async_run(run__nodes="4")
    config = _config(run_dir)
    for lane in range(4):
        claim(run_dir, config, lane, 0)
        _write_update(run_dir, lane, 0, base=0)
    command = [sys.executable, "-m", "aggregation.lane_cli", "arrive", "--config"]
    procs = [
        subprocess.Popen(
            [*command, str(run_dir / CONFIG_FILE), "--lane", str(lane), "--step", "0"], cwd=ROOT
        )
        for lane in range(4)
    ]
    assert [p.wait(timeout=wait_s(120, 16)) for p in procs] == [0] * 4
    ledger = read_ledger(run_dir)
    assert ledger.version == 4
    assert sorted(u for v in ledger.versions for u in v["updates"]) == [
        "0:0",
        "1:0",
        "2:0",
        "3:0",
    ]
    assert sorted(s for v in ledger.versions for s in v["staleness"]) == [0, 1, 2, 3]


def test_an_update_newer_than_the_model_is_rejected_and_the_run_goes_on(
    async_run: Callable,
) -> None:
    run_dir = async_run()
    config = _config(run_dir)
    claim(run_dir, config, 0, 0)
    _write_update(run_dir, 0, 0, base=0)
    path = lane_job_dir(run_dir, 0, 0) / UPDATE_FILE
    tensors, _ = load_tensors(path)
    save_tensors(path, tensors, update_metadata(0, 0, 48, 5))
    assert arrive(run_dir, config, 0, 0, 0, 0, 2) == 0
    assert "base_version is '5', not a version of the global model (0 to 0)" in _events(run_dir)
    ledger = read_ledger(run_dir)
    assert ledger.version == 0 and ledger.accepted == 0 and not ledger.claims

    claim(run_dir, config, 0, 1)
    _write_update(run_dir, 0, 1, base=0)
    assert arrive(run_dir, config, 0, 1, 0, 0, 2) == 0
    assert read_ledger(run_dir).version == 1


def test_a_nan_update_is_rejected_with_its_reason(async_run: Callable) -> None:
    run_dir = async_run()
    config = _config(run_dir)
    claim(run_dir, config, 1, 0)
    _write_update(run_dir, 1, 0, base=0, delta=math.nan)
    assert arrive(run_dir, config, 1, 0, 0, 0, 2) == 0
    assert "lane 1 step 0: rejected: tensor" in _events(run_dir)
    assert "NaN" in read_ledger(run_dir).done["1:0"]


def test_a_failing_job_is_retried_then_its_lane_goes_on(async_run: Callable) -> None:
    run_dir = async_run(async__updates="1")
    config = _config(run_dir)
    claim(run_dir, config, 0, 0)
    assert arrive(run_dir, config, 0, 0, 75, 0, 2) == 75  # DAGMan retries
    assert arrive(run_dir, config, 0, 0, 75, 2, 2) == 0  # last try: the lane goes on
    ledger = read_ledger(run_dir)
    assert ledger.done["0:0"] == "failed 3 times, last exit code 75" and not ledger.claims
    assert "the lane goes on with its next job" in _events(run_dir)
    assert claim(run_dir, config, 0, 1) == 0  # the budget it held is free again
    assert arrive(run_dir, config, 0, 2, -1002, 0, 2) == 0
    assert "removed" in read_ledger(run_dir).done["0:2"]
    claim(run_dir, config, 1, 0)
    assert arrive(run_dir, config, 1, 0, EXIT_FATAL, 0, 2) == EXIT_FATAL
    assert "1:0" not in read_ledger(run_dir).done  # fixed and resumed, the job runs again


def test_a_job_killed_by_a_signal_is_retried_like_a_failed_one(async_run: Callable) -> None:
    """$RETURN -9: the machine killed the job; -1001/-1002 (never submitted, removed) are not
    retried."""
    run_dir = async_run()
    config = _config(run_dir)
    claim(run_dir, config, 0, 0)
    assert arrive(run_dir, config, 0, 0, -9, 0, 2) == 1  # DAGMan retries
    assert "0:0" in read_ledger(run_dir).claims  # still held for the retry
    assert arrive(run_dir, config, 0, 0, -9, 2, 2) == 0  # last try: the lane goes on
    assert read_ledger(run_dir).done["0:0"] == "failed 3 times, last killed by signal 9"
    for step, code in ((1, -1001), (2, -1002)):
        claim(run_dir, config, 0, step)
        assert arrive(run_dir, config, 0, step, code, 0, 2) == 0
        assert read_ledger(run_dir).done[f"0:{step}"].startswith("removed")


def test_an_arrival_seen_twice_is_applied_once(async_run: Callable) -> None:
    run_dir = async_run()
    config = _config(run_dir)
    claim(run_dir, config, 0, 0)
    _write_update(run_dir, 0, 0, base=0)
    arrive(run_dir, config, 0, 0, 0, 0, 2)
    arrive(run_dir, config, 0, 0, 0, 0, 2)
    assert read_ledger(run_dir).version == 1
    assert claim(run_dir, config, 0, 0) == EXIT_SKIP  # a rerun node skips its finished job


def test_a_kill_before_the_ledger_is_saved_redoes_the_same_version(
    async_run: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = async_run()
    config = _config(run_dir)
    claim(run_dir, config, 0, 0)
    _write_update(run_dir, 0, 0, base=0)

    def killed(*_: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("aggregation.async_state.write_ledger", killed)
        with pytest.raises(KeyboardInterrupt):
            arrive(run_dir, config, 0, 0, 0, 0, 2)
    written = model_path(run_dir, 1).read_bytes()
    assert read_ledger(run_dir).version == 0  # the version does not exist for the run yet
    assert arrive(run_dir, config, 0, 0, 0, 0, 2) == 0
    assert read_ledger(run_dir).version == 1
    assert model_path(run_dir, 1).read_bytes() == written


@pytest.mark.slow
def test_async_run_lets_fast_lanes_work_more_and_resumes_after_a_kill(
    async_run: Callable,
) -> None:
    """Lane 0 is twenty times slower; the fast lanes take its share of the budget. A run killed
    with SIGKILL resumes from the last applied version and applies each update once."""
    run_dir = async_run(async__updates="9", faults__slow="[[0, 20.0]]")
    command = [sys.executable, "-m", "pipeline.cli", "run", str(run_dir), "--slots", "3"]
    runner = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    try:
        _wait_for(
            lambda: (run_dir / "async/state.json").is_file() and read_ledger(run_dir).version >= 2
        )
    finally:
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait()
    killed_at = read_ledger(run_dir).version
    kept = model_path(run_dir, killed_at).read_bytes()

    assert subprocess.run(command, cwd=ROOT).returncode == 0
    report = json.loads((run_dir / "report.json").read_text())
    ledger = read_ledger(run_dir)
    applied = [u for v in ledger.versions for u in v["updates"]]
    assert len(applied) == len(set(applied)) == 9 == ledger.version
    assert model_path(run_dir, killed_at).read_bytes() == kept
    assert report["status"] == "completed" and report["updates_accepted"] == 9
    per_lane = report["jobs_per_lane"]
    assert per_lane["0"] < max(per_lane["1"], per_lane["2"])
    assert report["evaluations"][-1]["version"] == 9
    board = scalars(run_dir)  # each version once, though the kill came in the middle
    assert [step for step, _ in board["updates/nodes_used"]] == list(range(1, 10))
    assert [step for step, _ in board["heldout/accuracy"]] == [
        e["version"] for e in report["evaluations"]
    ]
    assert set(report["node_usage"]) == {"0", "1", "2"}
    assert (run_dir / "accuracy.png").stat().st_size > 0


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + wait_s(180, 30)
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_status_shows_lanes_and_the_ledger(async_run: Callable) -> None:
    run_dir = async_run()
    status = read_status(run_dir)
    assert status.state == "not started" and len(status.rounds) == 3
    assert status.lanes == "0/6 updates, version 0"
    assert status.nodes_per_round == lane_length(_config(run_dir))
    assert "lane" in str(render(status).renderables[1].columns[0].header)


def test_submit_accepts_an_asynchronous_run_directory(async_run: Callable) -> None:
    run_dir = async_run()
    check_run_dir(run_dir)
    (run_dir / "scripts/lane.sh").unlink()
    with pytest.raises(UserError, match=r"missing scripts/lane\.sh"):
        check_run_dir(run_dir)


def test_stale_batchnorm_statistics_are_mixed_never_negative(async_run: Callable) -> None:
    """Subtracting a stale variance delta from a newer model can go below zero; mixing the
    nodes' own statistics cannot."""
    run_dir = async_run(server__lr="1.0")
    config = _config(run_dir)
    for lane in (0, 1):
        claim(run_dir, config, lane, 0)
    variances = {0: 0.1, 1: 0.5}  # each node's own running variance; version 0 has 1.0
    for lane, local in variances.items():
        path = lane_job_dir(run_dir, lane, 0) / UPDATE_FILE
        update = _write_update(run_dir, lane, 0, base=0)
        for name in update:
            if name.endswith("running_var"):
                update[name] = torch.full_like(update[name], 1.0 - local)
        save_tensors(path, update, update_metadata(0, lane, 48, 0))
    arrive(run_dir, config, 0, 0, 0, 0, 2)
    arrive(run_dir, config, 1, 0, 0, 0, 2)
    weight = staleness_weight("polynomial", 1, 0.5, 4)
    v2, _ = load_tensors(model_path(run_dir, 2))
    variances_v2 = [t for name, t in v2.items() if name.endswith("running_var")]
    assert variances_v2
    for tensor in variances_v2:
        assert torch.allclose(tensor, torch.full_like(tensor, (1 - weight) * 0.1 + weight * 0.5))
