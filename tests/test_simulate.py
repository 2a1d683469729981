"""`dagtrain simulate`: DAGMan's semantics on small planned DAGs, in virtual time."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import main
from pipeline.config import load
from pipeline.simulate import pool_model
from pipeline.simulate.engine import simulate
from pipeline.simulate.summary import summarise
from pipeline.simulate.workload import plan_workload

STEP_S, STARTUP_S, AGGREGATE_S = 10.0, 5.0, 2.0


def _pool(machines: int = 3, **tables: dict[str, Any]) -> pool_model.PoolModel:
    """Dedicated machines of equal speed, matched at once: the times are easy to reason about."""
    raw: dict[str, dict[str, Any]] = {
        "machines": {"count": machines, "speed": "constant", "order": "listed"},
        "availability": {"on": "always"},
        "negotiation": {
            "interval_s": 0,
            "claim_reuse_s": 0,
            "periodic_s": 1,
            "submit_interval_s": 0,
        },
        "jobs": {
            "startup_s": STARTUP_S,
            "first_startup_s": 0,
            "step_s": STEP_S,
            "script_s": 0,
            "arrive_s": 0,
            "apply_s": 0,
            "aggregate_s": AGGREGATE_S,
            "report_s": 0,
            "merge_mb_s": 1e6,
        },
        "transfer": {"submit_host_mb_s": 1e6, "mirrors_mb_s": 1e6, "machine_mb_s": 1e6},
    }
    for name, keys in tables.items():
        raw[name] = raw.get(name, {}) | keys
    return pool_model.from_dict(raw, "test pool")


def _simulated(config: Path, *overrides: str, pool: pool_model.PoolModel | None = None, seed=0):
    work = plan_workload(load(config, list(overrides)))
    pool = pool or _pool()
    return summarise("test", simulate(work, pool, seed), work, pool.machines.count)


@pytest.fixture
def config(tiny_config: Callable[..., Path]) -> Path:
    return tiny_config()  # 3 nodes x 2 rounds of 4 steps


def test_a_round_takes_its_jobs_start_up_and_steps_then_the_aggregation(config: Path) -> None:
    result = _simulated(config)
    job = STARTUP_S + 4 * STEP_S
    assert result["dag_ok"]
    assert result["round_seconds"] == pytest.approx([job + AGGREGATE_S] * 2, abs=0.1)
    assert result["nodes_missing"] == [0, 0]
    assert result["jobs_run"] == 6


def test_a_node_failing_every_retry_counts_missing_and_the_round_goes_on_at_quorum(
    config: Path,
) -> None:
    result = _simulated(config, "faults.fail=[[0, 1]]", "run.retries=2", "run.quorum=0.6")
    assert result["dag_ok"]
    assert result["nodes_missing"] == [1, 0]
    assert result["jobs_run"] == 6 + 2  # node 1 of round 0 ran three times


def test_retries_exhausted_below_the_quorum_fail_the_aggregation_and_the_rounds_after(
    config: Path,
) -> None:
    result = _simulated(config, "faults.fail=[[0, 1]]", "run.retries=1", "run.quorum=1.0")
    assert not result["dag_ok"]
    assert result["failed_nodes"] == ["aggregate_r000"]
    assert result["jobs_run"] == 3 + 1  # round 1 never ran


def test_a_straggler_past_the_deadline_is_removed_and_the_round_ends_at_the_deadline(
    config: Path,
) -> None:
    result = _simulated(config, "faults.hang=[[0, 2]]", "run.node_deadline_s=300", "run.quorum=0.6")
    assert result["dag_ok"]
    assert result["nodes_missing"] == [1, 0]
    first, second = result["round_seconds"]
    assert 300 <= first <= 300 + 1 + AGGREGATE_S + 0.1  # removed at the next periodic check
    assert second == pytest.approx(STARTUP_S + 4 * STEP_S + AGGREGATE_S, abs=0.1)


def test_async_lanes_spend_the_budget_with_stale_updates_from_a_slow_lane(config: Path) -> None:
    result = _simulated(config, "run.mode=async", "faults.slow=[[0, 4.0]]")
    assert result["dag_ok"]
    assert result["versions"] == 6  # nodes x rounds updates, one version each (buffer 1)
    assert sum(result["staleness"]["histogram"].values()) == 6
    assert result["staleness"]["max"] >= 2  # the slow lane's update came back versions later
    assert result["jobs_skipped"] > 0  # PRE_SKIP once the budget was spoken for


def test_maxjobs_holds_back_a_categorys_jobs(config: Path) -> None:
    result = _simulated(config, "run.max_node_jobs=1", "run.rounds=1")
    job = STARTUP_S + 4 * STEP_S
    assert result["round_seconds"] == pytest.approx([3 * job + AGGREGATE_S], abs=0.1)


def test_the_same_seed_gives_the_same_run_and_another_seed_another(config: Path) -> None:
    pool = _pool(
        machines=4,
        availability={
            "on": "weibull",
            "on_shape": 0.6,
            "on_scale_s": 60,
            "off_scale_s": 30,
            "share_at_start": 0.5,
        },
    )
    runs = [_simulated(config, pool=pool, seed=seed) for seed in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0]["seconds_to_finish"] != runs[2]["seconds_to_finish"]
    assert runs[0]["evictions"] > 0


def test_the_command_prints_and_writes_json_and_a_plot(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim"
    assert main(["simulate", str(config), "--machines", "5", "--out", str(out)]) == 0
    assert (out / "simulate.png").stat().st_size > 0
    text = (out / "simulate.json").read_text()
    assert '"variant": "async"' in text and '"variant": "sync, quorum 0.8"' in text


def test_the_command_gives_a_planner_note_once_for_its_three_variants(
    tiny_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(data__local_train="40")  # not a multiple of the batch: a note
    assert main(["simulate", str(config), "--out", str(tmp_path / "sim")]) == 0
    assert capsys.readouterr().err.count("is not a multiple of [train] batch_size") == 1


def test_an_evicted_job_resumes_from_its_last_checkpoint(config: Path) -> None:
    pool = _pool(
        machines=3,
        availability={
            "on": "weibull",
            "on_shape": 0.6,
            "on_scale_s": 30,
            "off_scale_s": 5,
            "share_at_start": 1.0,
        },
    )
    afresh = _simulated(config, pool=pool, seed=3)
    resumed = _simulated(config, "train.checkpoint_s=5", pool=pool, seed=3)
    assert afresh["evictions"] > 0 and afresh["saved_machine_seconds"] == 0
    assert resumed["saved_machine_seconds"] > 0
    assert resumed["lost_machine_seconds"] < afresh["lost_machine_seconds"]
