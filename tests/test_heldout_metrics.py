"""Held-out metrics on hand-made tensors: confusion matrices, recall, image-level votes, which
fragments vote for an image, and the report's figures and final keys."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from aggregation.heldout import IMAGE_POSITIONS, HeldOut, image_fragments, unrotated
from aggregation.heldout_metrics import (
    confusion_matrix,
    heldout_metrics,
    image_votes,
    recall,
)
from aggregation.report import build_report, write_report
from aggregation.report_plots import curves, wall_times
from node_payload.common.manifest import Manifest
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import round_metrics_path
from pipeline.run_summary import summary_line


class FirstPixels(nn.Module):
    """Logits read straight from the input: the first `classes` values of each sample."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, : self.classes]


def _inputs(rows: list[list[float]]) -> torch.Tensor:
    """Samples of shape (1, 2, 2) whose first values are the given logits."""
    x = torch.zeros(len(rows), 1, 2, 2)
    x.view(len(rows), -1)[:, : len(rows[0])] = torch.tensor(rows)
    return x


def test_confusion_matrix_counts_true_classes_by_row_and_predictions_by_column() -> None:
    truth = torch.tensor([0, 0, 1, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 2, 0, 2])
    confusion = confusion_matrix(truth, predicted, 4)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    assert recall(confusion) == [0.5, 1.0, pytest.approx(2 / 3), None]  # class 3: no samples


def test_an_image_takes_the_argmax_of_its_mean_softmax_not_its_majority() -> None:
    # Image 0 (class 0): two fragments lean a little to class 1, one is sure of class 0.
    # Image 1 (class 1): both fragments say class 1.
    probabilities = torch.tensor([[0.45, 0.55], [0.45, 0.55], [0.99, 0.01], [0.2, 0.8], [0.3, 0.7]])
    image_of = torch.tensor([0, 0, 0, 1, 1])
    assert image_votes(probabilities, image_of, 2).tolist() == [0, 1]


def test_heldout_metrics_score_fragments_and_images_apart() -> None:
    sure, unsure = [4.0, -4.0], [-0.2, 0.2]  # softmax (1.00, 0.00) and (0.40, 0.60)
    heldout = HeldOut(
        classes=["healthy", "tumour"],
        x=_inputs([unsure, sure, [-3.0, 3.0], [3.0, -3.0]]),
        y=torch.tensor([0, 0, 1, 1]),
        image_x=_inputs([unsure, unsure, sure, [-1.0, 1.0], [-2.0, 2.0]]),
        image_of=torch.tensor([0, 0, 0, 1, 1]),
        image_y=torch.tensor([0, 1]),
    )
    metrics = heldout_metrics(FirstPixels(2), heldout)
    assert metrics["accuracy"] == 0.5
    assert metrics["confusion"] == [[1, 1], [1, 1]]
    assert metrics["image_accuracy"] == 1.0  # 3 of 5 image fragments right, both images right
    assert metrics["image_confusion"] == [[1, 0], [0, 1]]
    assert metrics["recall"] == {"healthy": 0.5, "tumour": 0.5}
    assert metrics["image_recall"] == {"healthy": 1.0, "tumour": 1.0}
    assert metrics["heldout_samples"] == 4 and metrics["heldout_images"] == 2
    assert metrics["classes"] == ["healthy", "tumour"]
    expected_loss = torch.nn.functional.cross_entropy(heldout.x.flatten(1)[:, :2], heldout.y)
    assert metrics["loss"] == pytest.approx(float(expected_loss))


@pytest.mark.parametrize(
    ("angles", "index"),
    [([0, 90, 180, 270], 0), ([45, 145, 245, 345], 3), ([30, 90, 150, 210, 270, 330], 0)],
)
def test_the_unrotated_angle_is_the_one_closest_to_zero_degrees(angles, index) -> None:
    assert unrotated(angles) == index


def test_every_heldout_image_votes_with_evenly_spaced_unrotated_fragments(
    tiny_dataset: Path,
) -> None:
    manifest = Manifest.load(tiny_dataset / "manifest.json")
    ids, image_of = image_fragments(manifest)
    held = [s for s, source in enumerate(manifest.sources) if source.holdout]
    assert sorted(set(image_of)) == list(range(len(held)))
    for image, s in enumerate(held):
        source = manifest.sources[s]
        mine = [manifest.fragment(i) for i, k in zip(ids, image_of, strict=True) if k == image]
        assert len(mine) == min(IMAGE_POSITIONS, source.nx * source.ny)
        assert {f.source for f in mine} == {s} and {f.angle for f in mine} == {0}
        xs, ys = {f.x for f in mine}, {f.y for f in mine}
        assert len({(f.x, f.y) for f in mine}) == len(mine)
        # spread over the whole grid, not one corner
        assert len(xs) > source.nx // 2 and len(ys) > source.ny // 2


def _round(round_: int, started_at: float, seconds: float, accuracy: float) -> dict:
    return {
        "round": round_,
        "accuracy": accuracy,
        "image_accuracy": min(1.0, accuracy + 0.2),
        "loss": 1.0,
        "classes": ["a", "b"],
        "recall": {"a": accuracy, "b": accuracy},
        "image_recall": {"a": 1.0, "b": 0.5},
        "confusion": [[3, 1], [1, 3]],
        "image_confusion": [[2, 0], [1, 1]],
        "seconds": seconds,
        "started_at": started_at,
        "bytes_downloaded": 0,
        "mirror_failovers": 0,
        "nodes_rejected": {},
    }


def test_the_wall_time_axis_counts_from_the_first_round_start() -> None:
    # Round 1 started 2 s after round 0 ended (the next node jobs queued): the axis keeps that
    # gap, where summing round seconds would put round 1 at 18 s.
    rounds = [_round(0, 1000.0, 8.0, 0.5), _round(1, 1010.0, 10.0, 0.6)]
    assert wall_times(rounds) == [8.0, 20.0]
    assert curves({"rounds": rounds})[:3] == ("round", [1, 2], [8.0, 20.0])
    async_rows = [{"version": 0, "seconds": 0.0}, {"version": 4, "seconds": 31.5}]
    assert curves({"mode": "async", "evaluations": async_rows})[1:3] == ([0, 4], [0.0, 31.5])
    old = {k: v for k, v in rounds[0].items() if k != "started_at"}
    assert wall_times([old, rounds[1]]) is None


def test_the_report_carries_the_final_model_s_metrics() -> None:
    rounds = [_round(0, 1000.0, 8.0, 0.5), _round(1, 1010.0, 10.0, 0.75)]
    report = build_report(RunConfig().with_values("run", rounds=2, name="t", nodes=2), rounds, 0)
    assert report["final_accuracy"] == 0.75 and report["final_image_accuracy"] == 0.95
    assert report["classes"] == ["a", "b"]
    assert report["final_recall"] == {"a": 0.75, "b": 0.75}
    assert report["final_image_recall"] == {"a": 1.0, "b": 0.5}
    assert report["final_confusion"] == [[3, 1], [1, 3]]
    assert report["final_image_confusion"] == [[2, 0], [1, 1]]
    old = {k: v for k, v in rounds[1].items() if k == "accuracy" or "image" not in k}
    old_report = build_report(RunConfig().with_values("run", rounds=2, name="t"), [old], 1)
    assert old_report["final_accuracy"] == 0.75 and old_report["final_image_accuracy"] is None


def test_the_final_node_writes_both_figures(tmp_path: Path) -> None:
    config = RunConfig().with_values("run", rounds=2, name="t", nodes=2)
    for r, row in enumerate([_round(0, 1000.0, 8.0, 0.5), _round(1, 1010.0, 10.0, 0.75)]):
        path = round_metrics_path(tmp_path, r)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(row))
    report = write_report(tmp_path, config, 0)
    assert report["final_image_accuracy"] == 0.95
    assert json.loads((tmp_path / "report.json").read_text())["final_confusion"] == [[3, 1], [1, 3]]
    for name in ("accuracy.png", "confusion.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_a_run_without_confusion_matrices_gets_no_confusion_figure(tmp_path: Path) -> None:
    config = RunConfig().with_values("run", rounds=1, name="t", nodes=2)
    row = {k: v for k, v in _round(0, 1000.0, 8.0, 0.5).items() if "confusion" not in k}
    path = round_metrics_path(tmp_path, 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(row))
    write_report(tmp_path, config, 0)
    assert (tmp_path / "accuracy.png").is_file() and not (tmp_path / "confusion.png").exists()


def test_the_final_console_line_shows_whole_image_accuracy(tmp_path: Path) -> None:
    report = {"status": "completed", "summary": "2/2 rounds", "final_accuracy": 0.8125}
    line = summary_line({**report, "final_image_accuracy": 0.95}, tmp_path)
    assert "final held-out accuracy 0.812 (whole images 0.950); report:" in line
    assert "whole images" not in summary_line(report, tmp_path)  # a run before image accuracy
