"""`dagtrain evaluate` and pipeline.evaluate: a run's model scored on labelled images with the
metric code of the run's own held-out evaluation (one implementation: precision and F1 included)."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import pipeline
from aggregation.heldout_metrics import (
    ImageVotes,
    confusion_matrix,
    f1,
    final_metrics,
    image_votes,
    level_metrics,
    precision,
)
from node_payload.common.errors import UserError
from pipeline.cli import main
from pipeline.dataset_prepare import prepare
from tests.inference_run import plan_run


@pytest.fixture(scope="module")
def run_dir(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    dataset = root / "dataset"
    prepare(tiny_source, dataset, tile=32, overlap=0.5, holdout=0.25, progress=False)
    return plan_run(root, dataset)


def test_precision_and_f1_by_class() -> None:
    truth = torch.tensor([0, 0, 1, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 2, 0, 2])
    confusion = confusion_matrix(truth, predicted, 4)
    assert precision(confusion) == [0.5, 0.5, 1.0, None]  # class 3: never predicted
    assert f1(confusion) == [0.5, pytest.approx(2 / 3), pytest.approx(0.8), None]
    assert f1(confusion_matrix(torch.tensor([0, 1]), torch.tensor([1, 0]), 2)) == [0.0, 0.0]
    metrics = level_metrics(["a", "b", "c", "d"], confusion, "image_")
    assert metrics["image_precision"] == {"a": 0.5, "b": 0.5, "c": 1.0, "d": None}
    assert metrics["image_accuracy"] == pytest.approx(4 / 6)


def test_image_votes_summed_batch_by_batch_equal_one_pass() -> None:
    probabilities = torch.rand(50, 3).softmax(dim=1)
    image_of = torch.randint(0, 4, (50,))
    votes = ImageVotes(4, 3)
    for start in range(0, 50, 7):
        votes.add(probabilities[start : start + 7], image_of[start : start + 7])
    assert votes.votes().tolist() == image_votes(probabilities, image_of, 4).tolist()
    assert votes.counts.tolist() == torch.bincount(image_of, minlength=4).tolist()


def test_the_report_carries_precision_and_f1_of_the_final_model() -> None:
    confusion = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2)
    last = {"classes": ["a", "b"], **level_metrics(["a", "b"], confusion)}
    final = final_metrics(last)
    assert final["final_precision"] == {"a": 0.5, "b": 1.0}
    assert final["final_f1"] == {"a": pytest.approx(2 / 3), "b": pytest.approx(2 / 3)}
    assert final["final_image_f1"] is None  # not in this evaluation


def test_evaluate_scores_fragments_and_images_and_writes_json_and_figure(
    run_dir: Path, tiny_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ev"
    assert main(["evaluate", str(run_dir), str(tiny_source), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "evaluation.json").read_text())
    assert (out / "confusion.png").read_bytes().startswith(b"\x89PNG")
    assert result["images"] == 16 and result["fragments"] == 16 * 49 and result["round"] == 1
    assert sum(map(sum, result["confusion"])) == 16 * 49
    assert [sum(row) for row in result["image_confusion"]] == [4, 4, 4, 4]
    # the image level is what predict says about each image
    predicted = pipeline.predict(run_dir, [tiny_source])
    by_path = {p.path: p.predicted for p in predicted.images}
    assert {i["path"]: i["predicted"] for i in result["per_image"]} == by_path
    classes = result["classes"]
    truth = torch.tensor([classes.index(i["class"]) for i in result["per_image"]])
    votes = torch.tensor([classes.index(i["predicted"]) for i in result["per_image"]])
    expected = level_metrics(classes, confusion_matrix(truth, votes, 4), "image_")
    assert {k: result[k] for k in expected} == expected
    assert f"fragment accuracy {result['accuracy']:.3f} (784 fragments)" in printed
    assert result == pipeline.evaluate(run_dir, tiny_source, out_dir=tmp_path / "again")


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, " ".join(err.split())


def test_a_folder_of_an_unknown_class_is_named_with_the_fix(
    run_dir: Path, tiny_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labelled = Path(shutil.copytree(tiny_source, tmp_path / "labelled"))
    (labelled / "grain").rename(labelled / "tumour")
    code, err = _error(capsys, ["evaluate", str(run_dir), str(labelled), "--out", str(tmp_path)])
    assert code == 2
    assert (
        f"{labelled / 'tumour'}: the run has no class 'tumour' (its classes: cells, clouds, fibres, grain); rename the folder"
        in err
    )
    shutil.rmtree(labelled / "tumour")
    code, err = _error(capsys, ["evaluate", str(run_dir), str(labelled), "--out", str(tmp_path)])
    assert (
        code == 2
        and f"{labelled}: no folder for the run's class 'grain'; add {labelled / 'grain'}" in err
    )
    assert not (tmp_path / "evaluation.json").exists()


def test_a_bad_image_is_listed_and_the_others_are_scored(
    run_dir: Path, tiny_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labelled = Path(shutil.copytree(tiny_source, tmp_path / "labelled"))
    broken = labelled / "cells" / "0.png"
    broken.write_bytes(broken.read_bytes()[:100])
    code, err = _error(
        capsys, ["evaluate", str(run_dir), str(labelled), "--out", str(tmp_path / "ev")]
    )
    assert code == 1 and f"error: cannot decode image {broken}" in err
    result = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert result["images"] == 15 and [f["path"] for f in result["failures"]] == [str(broken)]


def test_evaluate_refuses_an_output_inside_the_run_and_an_empty_class_folder(
    run_dir: Path, tiny_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _error(
        capsys, ["evaluate", str(run_dir), str(tiny_source), "--out", str(run_dir / "ev")]
    )
    assert code == 2 and "inside the run directory" in err and not (run_dir / "ev").exists()
    labelled = Path(shutil.copytree(tiny_source, tmp_path / "labelled"))
    for image in (labelled / "fibres").iterdir():
        image.unlink()
    with pytest.raises(
        UserError, match=re.escape(f"class folder {labelled / 'fibres'} holds no PNG")
    ):
        pipeline.evaluate(run_dir, labelled)
