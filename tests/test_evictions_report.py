"""Evictions in round.json and report.json: counted from the node jobs' user logs, the work
each lost (since the job's start there or its last checkpoint) and saved (the training behind
the last checkpoint before it), per round, per run and in the report's per-node view."""

from __future__ import annotations

import json
import time
from pathlib import Path

from aggregation.evictions import (
    job_evictions,
    lane_evictions,
    node_evictions,
    round_evictions,
    run_evictions,
    with_evictions,
)
from aggregation.utilization import node_usage
from node_payload.common.run_layout import METRICS_FILE, lane_job_dir, node_dir

T0 = time.mktime(time.strptime("2026-12-01 10:00:00", "%Y-%m-%d %H:%M:%S"))


def _log(job_dir: Path, events: list[tuple[str, float]]) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{code} (012.000.000) {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(T0 + at))} "
        f"Job event\n...\n"
        for code, at in events
    ]
    (job_dir / "job.log").write_text("".join(lines))


def _checkpoints(job_dir: Path, written: list[tuple[float, float]]) -> None:
    history = {"written": [{"at": T0 + at, "step": 1, "seconds": s} for at, s in written]}
    (job_dir / METRICS_FILE).write_text(json.dumps({"checkpoints": history, "seconds": 9}))


def test_an_eviction_loses_the_work_since_the_last_checkpoint_and_saves_what_it_holds(
    tmp_path: Path,
) -> None:
    # Started at 0, checkpoints at 10 s and 20 s (8 and 16 s of training), evicted at 25 s,
    # restarted at 30 s, evicted again at 34 s before any checkpoint there, finished at 50 s.
    _log(tmp_path, [("000", 0), ("001", 0), ("004", 25), ("001", 30), ("004", 34),
                    ("001", 40), ("005", 50)])  # fmt: skip
    _checkpoints(tmp_path, [(10, 8.0), (20, 16.0), (45, 30.0)])
    figures = job_evictions(tmp_path)
    assert figures.count == 2
    assert figures.seconds_lost == (25 - 20) + (34 - 30)
    assert figures.seconds_saved == 16.0 + 16.0


def test_an_eviction_without_a_checkpoint_loses_all_its_work_there(tmp_path: Path) -> None:
    _log(tmp_path, [("000", 0), ("001", 3), ("004", 40), ("001", 41), ("005", 90)])
    (tmp_path / METRICS_FILE).write_text(json.dumps({"checkpoints": None}))
    figures = job_evictions(tmp_path)
    assert (figures.count, figures.seconds_lost, figures.seconds_saved) == (1, 37, 0.0)


def test_round_run_and_per_node_figures(tmp_path: Path) -> None:
    _log(node_dir(tmp_path, 0, 1), [("001", 0), ("004", 10), ("001", 11), ("005", 20)])
    _log(node_dir(tmp_path, 0, 0), [("001", 0), ("005", 20)])
    round_0 = round_evictions(tmp_path, 0, 3)  # node 2 never ran: no log
    assert round_0["evictions"] == 1 and round_0["eviction_seconds_lost"] == 10
    assert list(round_0["evictions_per_node"]) == ["1"]
    rounds = [round_0, round_0, {"round": 2}]  # a round written before evictions were counted
    assert run_evictions(rounds)["evictions"] == 2
    assert node_evictions(rounds) == {
        "1": {"evictions": 2, "eviction_seconds_lost": 20.0, "eviction_seconds_saved": 0.0}
    }
    usage = node_usage({0: 20.0, 1: 40.0, 2: 0.0}, 100.0)
    view = with_evictions(usage, node_evictions(rounds))["node_usage"]
    assert view["1"]["evictions"] == 2 and view["1"]["busy_seconds"] == 40.0
    assert "evictions" not in view["0"]


def test_an_asynchronous_run_counts_every_job_of_each_lane(tmp_path: Path) -> None:
    for step in range(3):
        _log(lane_job_dir(tmp_path, 1, step), [("001", 0), ("004", 5), ("001", 6), ("005", 9)])
    _log(lane_job_dir(tmp_path, 0, 0), [("001", 0), ("005", 9)])
    figures = lane_evictions(tmp_path, 2)
    assert figures["evictions"] == 3 and figures["eviction_seconds_lost"] == 15
    assert list(figures["evictions_per_node"]) == ["1"]
