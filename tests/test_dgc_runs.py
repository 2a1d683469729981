"""Compressed updates in whole runs: each lane's residual stays in the execute machine's cache
and never travels with the jobs; a job that lands without it starts from zero, and the rounds
count how often that happened."""

import json
from collections.abc import Callable
from pathlib import Path

import htcondor2
import pytest

from aggregation.async_claim import claim
from node_payload.common.run_config import read_run_config
from node_payload.common.run_layout import CONFIG_FILE, lane_job_dir
from pipeline import config as config_mod
from pipeline import planner
from pipeline.cli import main
from pipeline.local_runner.dag_file import parse_dag

DGC = {"compression__method": '"dgc"', "compression__sparsity": "0.99"}


@pytest.fixture
def plan_run(tiny_config: Callable[..., Path], tmp_path: Path) -> Callable[..., Path]:
    def plan(name: str = "run", **overrides: str) -> Path:
        path = tiny_config(**overrides)
        return planner.write(planner.make_plan(config_mod.load(path)), tmp_path / name)

    return plan


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_compressed_jobs_carry_no_residual(plan_run: Callable, mode: str) -> None:
    run_dir = plan_run(run__mode=f'"{mode}"', **DGC)
    submit = htcondor2.Submit((run_dir / "submit/node.sub").read_text())
    assert "residual" not in submit["transfer_input_files"] + submit["transfer_output_files"]
    assert not list(run_dir.glob("lanes/*/residual.safetensors"))
    if mode == "sync":
        node = parse_dag(run_dir / "dagtrain.dag").nodes["train_r001_n002"]
        assert not any("lanes" in arg for arg in node.post.args) and "ltag" not in node.vars
    else:
        claim(run_dir, read_run_config(run_dir / CONFIG_FILE), 1, 0)
        assert not (lane_job_dir(run_dir, 1, 0) / "residual.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_lanes_next_job_on_the_same_machine_finds_its_residual(
    plan_run: Callable, mode: str, tmp_path: Path
) -> None:
    """The local runner's slots share one machine, so every lane's cache hits."""
    cache = f'"{tmp_path / "machine-cache"}"'
    dense = plan_run("dense", run__mode=f'"{mode}"', data__node_cache=cache)
    compressed = plan_run("dgc", run__mode=f'"{mode}"', data__node_cache=cache, **DGC)
    for run_dir in (dense, compressed):
        assert main(["run", str(run_dir)]) == 0
    pattern = "rounds/r001/n*/metrics.json" if mode == "sync" else "lanes/*/j0001/metrics.json"
    second = [json.loads(p.read_text()) for p in compressed.glob(pattern)]
    assert second and all(m["residual"] == "loaded" and m["residual_jobs"] == 2 for m in second)
    assert all(m["bytes"]["on_machine"]["residual_in"] > 0 for m in second)
    assert not list(compressed.rglob("residual.safetensors"))
    report = json.loads((compressed / "report.json").read_text())
    dense_report = json.loads((dense / "report.json").read_text())
    assert 0 < report["update_bytes"] < dense_report["update_bytes"] / 5
    assert report["residual_misses"] == 0
    assert report["bytes_per_job"] < dense_report["bytes_per_job"]


@pytest.mark.slow
def test_a_lane_job_without_its_residual_starts_from_zero_and_is_counted(
    plan_run: Callable,
) -> None:
    """A relative node_cache lies in each job's own scratch folder, deleted with the job: every
    job lands on a machine that has no residual of its lane, as on a pool of many machines."""
    run_dir = plan_run(data__node_cache='"cache"', **DGC)
    assert main(["run", str(run_dir)]) == 0
    later = [json.loads(p.read_text()) for p in run_dir.glob("rounds/r001/n*/metrics.json")]
    assert later and all(m["residual"] == "none" and m["residual_jobs"] == 1 for m in later)
    rounds = [json.loads(p.read_text()) for p in sorted(run_dir.glob("rounds/r*/round.json"))]
    assert [r["residual_misses"] for r in rounds] == [0, len(later)]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["residual_misses"] == len(later) and report["status"] == "completed"
