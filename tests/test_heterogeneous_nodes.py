"""Heterogeneous nodes: slowed nodes ([faults] slow), slowed local-runner slots, utilization."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from test_local_runner_helpers import dag, job

from aggregation.report import build_report, busy_seconds, wall_seconds
from node_payload import faults
from node_payload.common.errors import UserError
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import node_dir
from pipeline.cli import main
from pipeline.config import from_dict
from pipeline.local_run import run_local
from pipeline.local_runner import run_dag


def _run(rounds: int, nodes: int) -> RunConfig:
    return RunConfig().with_values("run", rounds=rounds, nodes=nodes, name="t")


def _config(slow: list) -> dict:
    return {"data": {"source": "images"}, "faults": {"slow": slow}}


def test_slow_accepts_node_factor_pairs() -> None:
    assert from_dict(_config([[1, 3], [0, 1.5]])).config.faults.slow == ((1, 3), (0, 1.5))
    assert from_dict({"data": {"source": "images"}}).config.faults.slow == ()


@pytest.mark.parametrize(
    "slow",
    [[[1, 0.5]], [[-1, 2.0]], [[1.0, 2.0]], [[1]], [[1, 2, 3]], [[1, "2"]], [[1, True]], [1]],
)
def test_slow_rejects_bad_pairs(slow: list) -> None:
    with pytest.raises(UserError, match=r"\[faults\] slow"):
        from_dict(_config(slow))


def test_slowdown_combines_config_and_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    config = RunConfig().with_values("faults", slow=((1, 3.0),))
    monkeypatch.delenv(faults.SLOWDOWN_VARIABLE, raising=False)
    assert faults.slowdown(config, 0) == 1.0
    assert faults.slowdown(config, 1) == 3.0
    monkeypatch.setenv(faults.SLOWDOWN_VARIABLE, "2.0")
    assert faults.slowdown(config, 0) == 2.0
    assert faults.slowdown(config, 1) == 6.0


def test_slow_down_sleeps_factor_minus_one_times_the_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    faults.slow_down(3.0, 2.5)
    faults.slow_down(1.0, 2.5)
    assert slept == [5.0]


def _write_round(run_dir: Path, round_: int, node_seconds: dict[int, float]) -> None:
    for node, seconds in node_seconds.items():
        path = node_dir(run_dir, round_, node)
        path.mkdir(parents=True)
        (path / "metrics.json").write_text(json.dumps({"seconds": seconds}))


def _round(round_: int, started_at: float, seconds: float) -> dict:
    return {
        "round": round_,
        "accuracy": 0.5,
        "seconds": seconds,
        "started_at": started_at,
        "bytes_downloaded": 0,
        "mirror_failovers": 0,
        "nodes_rejected": {},
    }


def test_report_has_busy_seconds_and_utilization_per_node(tmp_path: Path) -> None:
    _write_round(tmp_path, 0, {0: 2.0, 1: 6.0})
    _write_round(tmp_path, 1, {0: 3.0})  # node 1 missing in round 1: nothing counted
    _write_round(tmp_path, 2, {0: 100.0, 1: 100.0})  # not in the report: round 2 unfinished
    rounds = [_round(0, 1000.0, 8.0), _round(1, 1010.0, 10.0)]
    busy = busy_seconds(tmp_path, len(rounds), nodes=3)
    assert busy == {0: 5.0, 1: 6.0, 2: 0.0}

    report = build_report(_run(rounds=3, nodes=3), rounds, 2, busy)
    assert report["wall_seconds"] == 20.0  # from 1000 to the end of round 1 at 1020
    assert report["node_usage"] == {
        "0": {"busy_seconds": 5.0, "utilization": 0.25},
        "1": {"busy_seconds": 6.0, "utilization": 0.3},
        "2": {"busy_seconds": 0.0, "utilization": 0.0},
    }
    assert report["mean_utilization"] == pytest.approx(0.55 / 3)


def test_rounds_without_start_times_give_no_utilization() -> None:
    old = _round(0, 0.0, 8.0)
    del old["started_at"]
    assert wall_seconds([old]) is None and wall_seconds([]) is None
    report = build_report(_run(rounds=1, nodes=1), [old], 0, {0: 4.0})
    assert report["node_usage"] == {"0": {"busy_seconds": 4.0, "utilization": None}}
    assert report["mean_utilization"] is None


def test_only_jobs_in_a_slowed_slot_get_its_environment(tmp_path: Path) -> None:
    # A and B run together (A takes slot 0, B slot 1); C starts after both, in slot 0 again.
    for name in "AB":
        job(tmp_path, name, f'echo "[$DAGTRAIN_SLOWDOWN]" > {tmp_path}/{name}.seen; sleep 1')
    job(tmp_path, "C", f'echo "[$DAGTRAIN_SLOWDOWN]" > {tmp_path}/C.seen')
    path = dag(tmp_path, "JOB A A.sub\nJOB B B.sub\nJOB C C.sub\nPARENT A B CHILD C\n")
    result = run_dag(path, slots=2, slot_environment={1: {"DAGTRAIN_SLOWDOWN": "3.0"}})
    assert result.ok
    seen = {name: (tmp_path / f"{name}.seen").read_text().strip() for name in "ABC"}
    assert seen == {"A": "[]", "B": "[3.0]", "C": "[]"}


@pytest.mark.parametrize("slow", [{2: 3.0}, {1: 0.5}, {0: float("inf")}])
def test_run_refuses_a_bad_slow_slot(tmp_path: Path, slow: dict[int, float]) -> None:
    with pytest.raises(UserError, match="slow slot"):
        run_local(tmp_path, slots=2, slow_slots=slow)


def test_slow_slot_option_must_be_slot_equals_factor(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["run", "somewhere", "--slow-slot", "1:3"])
    assert "expected SLOT=FACTOR" in capsys.readouterr().err


@pytest.mark.slow
def test_slowed_node_takes_longer_and_is_the_busier(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = tiny_config(run__nodes="2", run__rounds="1", faults__slow="[[1, 3.0]]")
    run_dir = tmp_path / "run"
    assert main(["plan", str(config), "--out", str(run_dir)]) == 0
    assert main(["run", str(run_dir), "--slots", "2"]) == 0

    fast = json.loads((node_dir(run_dir, 0, 0) / "metrics.json").read_text())
    slow = json.loads((node_dir(run_dir, 0, 1) / "metrics.json").read_text())
    assert fast["slowdown"] == 1.0 and slow["slowdown"] == 3.0
    assert slow["seconds"] == pytest.approx(3 * slow["real_seconds"], rel=0.1)
    report = json.loads((run_dir / "report.json").read_text())
    usage = report["node_usage"]
    assert 0 < usage["0"]["utilization"] < usage["1"]["utilization"] <= 1
