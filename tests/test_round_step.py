"""The aggregation job on a planned run: quorum, rejections, plain averaging, idempotence."""

import json
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from aggregation.quorum import QuorumNotMet
from aggregation.round_step import aggregate_round
from node_payload.common.manifest import Manifest
from node_payload.common.model_file import load_model
from node_payload.common.run_config import read_run_config
from node_payload.common.run_layout import model_path, node_dir, round_metrics_path
from node_payload.common.tensor_io import load_tensors, save_tensors, update_metadata
from pipeline.mirrors import serve
from pipeline.planner import plan_from_file


@pytest.fixture
def planned(tiny_config: Callable[..., Path], tmp_path: Path) -> Iterator[tuple[Path, dict]]:
    run_dir = plan_from_file(tiny_config(run__quorum="0.6"), tmp_path / "run")
    config = read_run_config(run_dir / "config.toml")
    ports = [int(url.rsplit(":", 1)[1]) for url in config.data.mirrors]
    with serve(Path(config.data.dataset), ports):
        yield run_dir, config


def _write_update(run_dir: Path, node: int, scale: float, samples: int) -> dict[str, torch.Tensor]:
    global_state, _ = load_tensors(model_path(run_dir, 0))
    torch.manual_seed(node)
    update = {
        name: torch.randn_like(t) * scale if t.is_floating_point() else t.clone()
        for name, t in global_state.items()
    }
    save_tensors(
        node_dir(run_dir, 0, node) / "update.safetensors",
        update,
        update_metadata(0, node, samples, 0),
    )
    return update


def test_plain_averaging_with_a_rejected_node(planned: tuple[Path, dict]) -> None:
    run_dir, config = planned
    first = _write_update(run_dir, 0, 0.01, 30)
    second = _write_update(run_dir, 1, 0.01, 10)
    bad = _write_update(run_dir, 2, 0.01, 10)
    bad[next(iter(bad))][0] = float("nan")
    save_tensors(node_dir(run_dir, 0, 2) / "update.safetensors", bad, update_metadata(0, 2, 10, 0))

    metrics = aggregate_round(run_dir, config, 0)

    assert metrics["nodes_used"] == 2
    assert "2" in json.dumps(metrics["nodes_rejected"])
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["heldout_samples"] > 0
    before, _ = load_tensors(model_path(run_dir, 0))
    after, meta = load_tensors(model_path(run_dir, 1))
    assert meta["version"] == "1"
    for name, value in before.items():
        if value.is_floating_point():
            expected = value - (first[name].double() * 30 + second[name].double() * 10) / 40
            torch.testing.assert_close(after[name], expected.to(value.dtype))


def test_rerun_of_a_finished_round_changes_nothing(planned: tuple[Path, dict]) -> None:
    run_dir, config = planned
    for node in range(3):
        _write_update(run_dir, node, 0.01, 10)
    aggregate_round(run_dir, config, 0)
    model_bytes = model_path(run_dir, 1).read_bytes()
    metrics_bytes = round_metrics_path(run_dir, 0).read_bytes()
    aggregate_round(run_dir, config, 0)
    assert model_path(run_dir, 1).read_bytes() == model_bytes
    assert round_metrics_path(run_dir, 0).read_bytes() == metrics_bytes


def test_below_quorum_names_missing_and_rejected_nodes(planned: tuple[Path, dict]) -> None:
    run_dir, config = planned
    _write_update(run_dir, 0, 0.01, 10)
    (node_dir(run_dir, 0, 1) / "update.safetensors").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(QuorumNotMet) as error:
        aggregate_round(run_dir, config, 0)
    message = str(error.value)
    assert "only 1 valid updates, the quorum needs 2" in message
    assert "missing nodes: 2" in message
    assert "node 1:" in message and "pickle" in message
    assert not model_path(run_dir, 1).exists()
    model, _ = load_model(model_path(run_dir, 0))
    assert model is not None


_NODE_METRICS = {
    "started_at": 0.0,
    "local_test_accuracy": 0.5,
    "bytes_downloaded": 0,
    "mirror_failovers": 0,
}


def test_round_metrics_report_the_coverage_of_training_positions(planned) -> None:
    run_dir, config = planned
    manifest = Manifest.load(Path(config.data.dataset) / "manifest.json")
    training = [s for s, src in enumerate(manifest.sources) if not src.holdout]
    ids = manifest.by_source()[training[0]]
    n_angles = len(manifest.angles)
    # two angles of one position and one angle of another: 2 positions
    listed = [ids[0], ids[1], ids[n_angles]]
    for node in (0, 1):
        _write_update(run_dir, node, 0.01, 10)
        (node_dir(run_dir, 0, node) / "metrics.json").write_text(
            json.dumps({"train_fragments": listed, **_NODE_METRICS})
        )
    metrics = aggregate_round(run_dir, config, 0)
    total = sum(len(manifest.by_source()[s]) for s in training) // n_angles
    assert metrics["coverage"] == pytest.approx(2 / total)


def test_round_metrics_hold_image_accuracy_recall_and_confusion(planned) -> None:
    run_dir, config = planned
    for node in range(3):
        _write_update(run_dir, node, 0.01, 10)
    metrics = aggregate_round(run_dir, config, 0)
    classes = Manifest.load(Path(config.data.dataset) / "manifest.json").classes
    assert metrics["classes"] == classes
    assert 0.0 <= metrics["image_accuracy"] <= 1.0
    assert set(metrics["recall"]) == set(metrics["image_recall"]) == set(classes)
    for key, total in (("confusion", "heldout_samples"), ("image_confusion", "heldout_images")):
        matrix = metrics[key]
        assert len(matrix) == len(classes) and sum(map(sum, matrix)) == metrics[total]
    assert "sources_per_class" not in metrics  # no node reported it


def test_sources_per_class_summarises_the_nodes_that_reported_it(planned, capsys) -> None:
    run_dir, config = planned
    reports = {0: {"min": 2, "mean": 3.5}, 1: {"min": 1, "mean": 2.5}, 2: "many"}
    for node, value in reports.items():
        _write_update(run_dir, node, 0.01, 10)
        (node_dir(run_dir, 0, node) / "metrics.json").write_text(
            json.dumps({"sources_per_class": value, **_NODE_METRICS})
        )
    metrics = aggregate_round(run_dir, config, 0)
    assert metrics["sources_per_class"] == {"min": 1, "mean": 3.0}
    assert "round 0 node 2: sources_per_class 'many' ignored" in capsys.readouterr().out


@pytest.mark.parametrize(
    "value",
    [
        "many",
        [1, 2],
        {"min": -1, "mean": 2.0},
        {"min": 1.5, "mean": 2.0},
        {"min": True, "mean": 2.0},
        {"min": 1, "mean": float("nan")},
        {"min": 1, "mean": "2"},
        {"min": 3, "mean": 2.0},
        {"min": 1},
        {"min": 1, "mean": 2.0, "max": 10**30},
    ],
)
def test_a_malformed_sources_per_class_is_left_out(planned, capsys, value) -> None:
    run_dir, config = planned
    for node in range(3):
        _write_update(run_dir, node, 0.01, 10)
    (node_dir(run_dir, 0, 1) / "metrics.json").write_text(
        json.dumps({"sources_per_class": value, **_NODE_METRICS})
    )
    metrics = aggregate_round(run_dir, config, 0)
    assert "sources_per_class" not in metrics
    assert "round 0 node 1: sources_per_class" in capsys.readouterr().out
