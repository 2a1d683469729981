"""TensorBoard event files: read back by TensorBoard's own reader, one file per aggregation, and
a rerun of an aggregation rewrites its points instead of adding them twice."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from aggregation.async_apply import arrive
from aggregation.async_claim import claim
from aggregation.tensorboard_log import Point, crc32c, write_points
from node_payload.common.run_config import read_run_config
from node_payload.common.run_layout import (
    CONFIG_FILE,
    TENSORBOARD_DIR,
    UPDATE_FILE,
    lane_job_dir,
    model_path,
)
from node_payload.common.tensor_io import load_tensors, save_tensors, update_metadata
from pipeline import config as config_mod
from pipeline import planner


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every tag's (step, value) points, as TensorBoard reads RUN_DIR/tensorboard."""
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def steps(run_dir: Path, tag: str) -> list[int]:
    return [step for step, _ in scalars(run_dir)[tag]]


def test_crc32c_is_castagnoli() -> None:
    assert crc32c(b"123456789") == 0xE3069283


def test_tensorboard_reads_the_points_and_a_rewrite_replaces_them(tmp_path: Path) -> None:
    write_points(tmp_path, "round.000001", [Point(1, 100.0, {"heldout/accuracy": 0.25})])
    write_points(tmp_path, "round.000002", [Point(2, 101.5, {"heldout/accuracy": 0.5})])
    write_points(tmp_path, "round.000002", [Point(2, 101.5, {"heldout/accuracy": 0.75})])
    assert scalars(tmp_path) == {"heldout/accuracy": [(1, 0.25), (2, 0.75)]}
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    assert [e.wall_time for e in events.Scalars("heldout/accuracy")] == [100.0, 101.5]
    assert sorted(p.name for p in (tmp_path / TENSORBOARD_DIR).iterdir()) == [
        "events.out.tfevents.round.000001",
        "events.out.tfevents.round.000002",
    ]


@pytest.fixture
def async_run(tiny_config: Callable[..., Path], tmp_path: Path) -> Path:
    path = tiny_config(run__mode='"async"')
    return planner.write(planner.make_plan(config_mod.load(path)), tmp_path / "run")


def _write_update(run_dir: Path, lane: int, step: int, base: int) -> None:
    model, _ = load_tensors(model_path(run_dir, base))
    update = {n: torch.full_like(t, 0.01) if t.is_floating_point() else t for n, t in model.items()}
    path = lane_job_dir(run_dir, lane, step) / UPDATE_FILE
    save_tensors(path, update, update_metadata(step, lane, 48, base))


def test_an_asynchronous_version_rerun_after_a_kill_is_one_point(
    async_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = async_run
    config = read_run_config(run_dir / CONFIG_FILE)
    for lane in (0, 1):
        claim(run_dir, config, lane, 0)
        _write_update(run_dir, lane, 0, base=0)

    def killed(*_: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # killed after the version's files, before the ledger
        patch.setattr("aggregation.async_state.write_ledger", killed)
        with pytest.raises(KeyboardInterrupt):
            arrive(run_dir, config, 0, 0, 0, 0, 2)
    assert steps(run_dir, "updates/nodes_used") == [1]
    assert arrive(run_dir, config, 0, 0, 0, 0, 2) == 0
    assert arrive(run_dir, config, 1, 0, 0, 0, 2) == 0

    found = scalars(run_dir)
    assert [step for step, _ in found["updates/nodes_used"]] == [1, 2]
    assert found["updates/staleness_max"] == [(1, 0.0), (2, 1.0)]
    size = (lane_job_dir(run_dir, 0, 0) / UPDATE_FILE).stat().st_size
    assert found["updates/bytes"][0] == (1, float(size))
    assert {"time/seconds", "updates/staleness_mean"} <= found.keys()
