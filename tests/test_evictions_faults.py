"""Eviction-aware runs: machines whose owners keep coming back ([faults] evict, nodes and
times drawn at random from a seed) evict node jobs again and again; with self-checkpointing,
a synchronous round with a quorum and a deadline and an asynchronous run both complete, and the
report names each evicted node and what the evictions cost."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from node_payload.common.run_layout import REPORT_FILE, lane_dir
from pipeline.cli import main
from tests.checkpoint_training import steps_in

NODES, TIMES = 4, 2  # half the machines evict each of their jobs twice


def _evicting_share(seed: int) -> str:
    """[faults] evict for a random half of the nodes, each at a random second into its runs."""
    draw = random.Random(seed)
    nodes = sorted(draw.sample(range(NODES), NODES // 2))
    return "[" + ", ".join(f"[{n}, {draw.uniform(0.3, 1.0):.2f}, {TIMES}]" for n in nodes) + "]"


def _run(config: Path, run_dir: Path) -> dict:
    assert main(["plan", str(config), "--out", str(run_dir)]) == 0
    assert main(["run", str(run_dir), "--slots", "3"]) == 0
    return json.loads((run_dir / REPORT_FILE).read_text())


def _evictions(job_log: Path) -> int:
    """Evicted (004) events in a job's user log."""
    return len(re.findall(r"^004 ", job_log.read_text(), re.MULTILINE)) if job_log.is_file() else 0


@pytest.mark.slow
def test_a_quorum_and_deadline_round_survives_8_evictions(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    faults = _evicting_share(seed=14)
    config = tiny_config(
        run__nodes=str(NODES), run__rounds="2", run__quorum="0.75", run__node_deadline_s="900",
        train__local_steps=str(steps_in(3)), train__checkpoint_s="1", faults__evict=faults,
    )  # fmt: skip
    report = _run(config, tmp_path / "run")
    assert report["status"] == "completed" and report["rounds_completed"] == 2
    assert report["evictions"] == 8  # 2 nodes x 2 rounds x 2 times
    evicted = {int(n) for n, u in report["node_usage"].items() if u.get("evictions")}
    assert evicted == {int(p.split(",")[0]) for p in faults.strip("[]").split("], [")}
    assert all(report["node_usage"][str(n)]["evictions"] == 4 for n in evicted)
    assert [r["evictions"] for r in report["rounds"]] == [4, 4]


@pytest.mark.slow
def test_an_asynchronous_run_survives_2_evictions_of_every_job_of_half_its_lanes(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    faults = _evicting_share(seed=15)
    config = tiny_config(
        run__mode='"async"', run__nodes=str(NODES), async__updates="8",
        train__local_steps=str(steps_in(3)), train__checkpoint_s="1", faults__evict=faults,
    )  # fmt: skip
    run_dir = tmp_path / "run"
    report = _run(config, run_dir)
    assert report["status"] == "completed"
    lanes = [int(p.split(",")[0]) for p in faults.strip("[]").split("], [")]
    logs = [log for lane in lanes for log in lane_dir(run_dir, lane).glob("*/job.log")]
    ran = [log for log in logs if "Job executing" in log.read_text()]
    assert ran  # the evicting lanes' jobs ran, and each was evicted twice, then finished
    assert [_evictions(log) for log in ran] == [TIMES] * len(ran)
    assert report["evictions"] == TIMES * len(ran)
    assert sorted(int(n) for n, u in report["node_usage"].items() if u.get("evictions")) == lanes
    others = [lane_dir(run_dir, n) for n in range(NODES) if n not in lanes]
    assert sum(_evictions(log) for d in others for log in d.glob("*/job.log")) == 0
