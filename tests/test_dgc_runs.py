"""Compressed updates in whole runs: each lane's residual is kept on the submit host and
travels with the lane's next job, in synchronous and asynchronous mode."""

import json
from collections.abc import Callable
from pathlib import Path

import htcondor2
import pytest

from aggregation.async_claim import claim
from node_payload.common.run_config import read_run_config
from node_payload.common.run_layout import CONFIG_FILE, RESIDUAL_FILE, lane_dir, lane_job_dir
from node_payload.common.tensor_io import read_metadata
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


def test_sync_jobs_take_and_return_their_lanes_residual(plan_run: Callable) -> None:
    run_dir = plan_run(**DGC)
    run_id = read_run_config(run_dir / CONFIG_FILE).run.run_id
    for lane in range(3):
        metadata = read_metadata(lane_dir(run_dir, lane) / RESIDUAL_FILE)
        assert metadata["run_id"] == run_id and metadata["lane"] == str(lane)
    submit = htcondor2.Submit((run_dir / "submit/node.sub").read_text())
    assert submit["transfer_input_files"].endswith("../../../lanes/$(ltag)/residual.safetensors")
    assert submit["transfer_output_files"].endswith(", residual.safetensors")
    node = parse_dag(run_dir / "dagtrain.dag").nodes["train_r001_n002"]
    assert node.vars["ltag"] == "l002"
    assert node.post.args[-2:] == ["rounds/r001/n002", "lanes/l002"]


def test_dense_runs_carry_no_residual(plan_run: Callable) -> None:
    run_dir = plan_run()
    submit = htcondor2.Submit((run_dir / "submit/node.sub").read_text())
    assert "residual" not in submit["transfer_input_files"] + submit["transfer_output_files"]
    assert not (run_dir / "lanes").exists()


def test_async_claim_gives_the_job_a_copy_of_its_lanes_residual(plan_run: Callable) -> None:
    run_dir = plan_run(run__mode='"async"', **DGC)
    submit = htcondor2.Submit((run_dir / "submit/node.sub").read_text())
    assert submit["transfer_input_files"].endswith("global.safetensors, residual.safetensors")
    claim(run_dir, read_run_config(run_dir / CONFIG_FILE), 1, 0)
    given = lane_job_dir(run_dir, 1, 0) / RESIDUAL_FILE
    assert given.read_bytes() == (lane_dir(run_dir, 1) / RESIDUAL_FILE).read_bytes()
    assert given.stat().st_ino != (lane_dir(run_dir, 1) / RESIDUAL_FILE).stat().st_ino


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_residuals_travel_from_job_to_job_of_a_lane(plan_run: Callable, mode: str) -> None:
    dense = plan_run("dense", run__mode=f'"{mode}"')
    compressed = plan_run("dgc", run__mode=f'"{mode}"', **DGC)
    for run_dir in (dense, compressed):
        assert main(["run", str(run_dir)]) == 0
    pattern = "rounds/r001/n*/metrics.json" if mode == "sync" else "lanes/*/j0001/metrics.json"
    second = [json.loads(p.read_text()) for p in compressed.glob(pattern)]
    assert second and all(m["residual"] == "loaded" and m["residual_jobs"] == 2 for m in second)
    sent = json.loads((compressed / "report.json").read_text())["update_bytes"]
    dense_sent = json.loads((dense / "report.json").read_text())["update_bytes"]
    assert 0 < sent < dense_sent / 5
