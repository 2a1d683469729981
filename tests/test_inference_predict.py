"""`dagtrain predict` and pipeline.load_model / pipeline.predict: a run's model classifies image
files as training cut them, and an untrusted run directory, model or image is one clear message."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import pipeline
from aggregation.heldout import unrotated
from node_payload.batches import to_tensor
from node_payload.common.errors import UserError
from node_payload.common.manifest import Manifest
from node_payload.common.run_config import read_run_config
from node_payload.common.run_layout import CONFIG_FILE, model_path
from pipeline import baseline
from pipeline.cli import main
from pipeline.dataset_prepare import prepare
from pipeline.inference.predict import Predictions
from tests.inference_run import plan_run


@pytest.fixture(scope="module")
def run_dir(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    dataset = root / "dataset"
    prepare(tiny_source, dataset, tile=32, overlap=0.5, holdout=0.25, progress=False, lossless=True)
    return plan_run(root, dataset, rounds=3)


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the run to break (the manifest stays where config.toml says)."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def test_an_image_s_probabilities_are_the_mean_softmax_of_its_training_fragments(
    run_dir: Path, tiny_source: Path
) -> None:
    config = read_run_config(run_dir / CONFIG_FILE)
    manifest = Manifest.load(Path(config.data.dataset) / "manifest.json")
    source = 5
    path = tiny_source / manifest.sources[source].path
    result = pipeline.predict(run_dir, [path])
    # by hand: the dataset's unrotated fragments of that source, through the last model
    angle = unrotated(manifest.angles)
    ids = list(manifest.by_source()[source])[angle :: len(manifest.angles)]
    pixels = baseline.read_fragments(manifest, Path(config.data.dataset), ids).images
    model = pipeline.load_model(run_dir).model
    with torch.no_grad():
        expected = model(to_tensor(pixels, config.model.image_size)).softmax(dim=1).mean(dim=0)
    (image,) = result.images
    assert image.fragments == len(ids) == 7 * 7
    assert list(image.probabilities.values()) == pytest.approx(expected.tolist(), abs=1e-6)
    assert image.predicted == manifest.classes[int(expected.argmax())]
    assert result.round == 2 and result.classes == manifest.classes and result.angles == [0]


def test_probabilities_sum_to_one_and_test_time_rotations_multiply_the_fragments(
    run_dir: Path, tiny_source: Path
) -> None:
    plain = pipeline.predict(run_dir, [tiny_source])
    rotated = pipeline.predict(run_dir, [tiny_source / "cells"], tta="0:360:90", batch=7)
    assert len(plain.images) == 16 and not plain.failures
    for image in plain.images + rotated.images:
        assert sum(image.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert image.predicted == max(image.probabilities, key=image.probabilities.get)
    assert [i.fragments for i in rotated.images] == [4 * 49] * 4
    assert rotated.angles == [0, 90, 180, 270]


def test_the_round_chooses_the_model_and_defaults_to_the_last(
    run_dir: Path, tiny_source: Path
) -> None:
    image = [tiny_source / "grain" / "1.png"]
    by_round = [pipeline.predict(run_dir, image, round=r).images[0] for r in (0, 1, 2)]
    assert pipeline.predict(run_dir, image).images[0] == by_round[2]
    assert by_round[0].probabilities != by_round[1].probabilities != by_round[2].probabilities
    assert pipeline.load_model(run_dir, round=1).path == model_path(run_dir, 1)


def test_the_cli_writes_csv_or_json_and_prints_csv_without_out(
    run_dir: Path, tiny_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tiny_source / "clouds"
    assert main(["predict", str(run_dir), str(images), "--out", str(tmp_path / "p.csv")]) == 0
    assert main(["predict", str(run_dir), str(images), "--out", str(tmp_path / "p.json")]) == 0
    assert main(["predict", str(run_dir), str(images / "0.png"), "--workers", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    rows = (tmp_path / "p.csv").read_text().splitlines()
    header = "path,predicted,fragments,p_cells,p_clouds,p_fibres,p_grain"
    assert rows[0] == printed[0] == header and len(rows) == 5
    assert printed[1] == rows[1]
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["classes"] == ["cells", "clouds", "fibres", "grain"] and doc["failures"] == []
    assert [i["path"] for i in doc["images"]] == [r.split(",")[0] for r in rows[1:]]
    assert Predictions(**{**doc, "images": [], "failures": []}).round == 2


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, " ".join(err.split())


def test_a_bad_image_is_one_message_and_the_other_images_go_on(
    run_dir: Path, tiny_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncated = tmp_path / "truncated.png"
    data = (tiny_source / "cells" / "0.png").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(grey)
    good = tiny_source / "cells" / "1.png"
    out = tmp_path / "out.json"
    argv = ["predict", str(run_dir), str(truncated), str(good), str(grey), "--out", str(out)]
    code, err = _error(capsys, argv)
    assert code == 1
    assert f"error: cannot decode image {truncated} (truncated or corrupt?)" in err
    assert f"error: image {grey} is greyscale but the run's model takes colour (RGB) images" in err
    doc = json.loads(out.read_text())
    assert [i["path"] for i in doc["images"]] == [str(good)]
    assert [f["path"] for f in doc["failures"]] == [str(truncated), str(grey)]


def test_a_tiff_with_strips_past_its_end_is_one_message_and_the_other_images_go_on(
    run_dir: Path, tiny_source: Path, tmp_path: Path
) -> None:
    good = tiny_source / "cells" / "1.png"
    broken = tmp_path / "broken.tif"
    tifffile.imwrite(broken, np.asarray(Image.open(good)), rowsperstrip=8, compression="zlib")
    broken.write_bytes(broken.read_bytes()[:-2000])  # the last strips are cut off
    result = pipeline.predict(run_dir, [broken, good])
    assert [i.path for i in result.images] == [str(good)]
    (failure,) = result.failures
    assert failure.path == str(broken)
    assert failure.error.startswith(f"cannot decode image {broken}: its strip ")
    assert "lies past the end of the file" in failure.error


def test_nothing_predict_writes_can_replace_a_file_of_the_run(
    run_dir: Path, tiny_source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = run_dir / "report.json"
    code, err = _error(capsys, ["predict", str(run_dir), str(tiny_source), "--out", str(target)])
    assert code == 2 and "inside the run directory" in err and not target.exists()
    code, err = _error(capsys, ["predict", str(run_dir), str(tiny_source), "--out", "p.txt"])
    assert code == 2 and "p.txt: name a .csv or a .json file" in err


def test_empty_inputs_are_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    code, err = _error(capsys, ["predict", str(run_dir), str(tmp_path / "empty")])
    assert code == 2 and f"{tmp_path / 'empty'}: holds no PNG, JPEG or TIFF images" in err
    with pytest.raises(UserError, match="no images given"):
        pipeline.predict(run_dir, [])


def test_a_negative_batch_is_refused_and_0_picks_one(run_dir: Path, tiny_source: Path) -> None:
    with pytest.raises(UserError, match="--batch must be at least 0"):
        pipeline.predict(run_dir, [tiny_source / "cells"], batch=-1)
    picked = pipeline.predict(run_dir, [tiny_source / "cells"], batch=0)
    one_by_one = pipeline.predict(run_dir, [tiny_source / "cells"], batch=1)
    for a, b in zip(picked.images, one_by_one.images, strict=True):
        assert a.predicted == b.predicted
        assert list(a.probabilities.values()) == pytest.approx(list(b.probabilities.values()))


def test_a_run_without_a_trained_model_says_how_to_get_one(
    run_dir: Path, tiny_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(run_dir, tmp_path)
    for r in (1, 2):
        model_path(run, r).unlink()
    code, err = _error(capsys, ["predict", str(run), str(tiny_source)])
    assert code == 2
    assert f"{run}: no trained model yet, only the initial global_r000.safetensors" in err
    assert "pass --round 0" in err
    code, err = _error(capsys, ["predict", str(run), str(tiny_source), "--round", "5"])
    assert code == 2 and "global_r005.safetensors: no such model; --round may be one of 0" in err
    code, err = _error(capsys, ["predict", str(tmp_path), str(tiny_source)])
    assert code == 2 and f"{tmp_path}: not a run directory (no config.toml)" in err


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:200]), "is not a safetensors file"),
        (lambda p: p.write_bytes(b"\x80\x04garbage"), "is a pickle / torch.save file"),
        (lambda p: p.write_bytes(b""), "is not a safetensors file"),
    ],
)
def test_a_corrupt_model_file_is_named_with_the_fix(
    run_dir: Path,
    tiny_source: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage,
    message,
) -> None:
    run = _copy(run_dir, tmp_path)
    damage(model_path(run, 2))
    code, err = _error(capsys, ["predict", str(run), str(tiny_source)])
    assert code == 2 and str(model_path(run, 2)) in err and message in err
    assert "pick another with --round" in err


def test_a_model_of_another_run_or_with_nan_weights_is_refused(
    run_dir: Path, tmp_path: Path
) -> None:
    from node_payload.common.model_file import load_model, save_model

    run = _copy(run_dir, tmp_path)
    model, metadata = load_model(model_path(run, 2))
    save_model(model_path(run, 2), model, {**metadata, "num_classes": "7"})
    with pytest.raises(
        UserError, match=r"not a model of this run: num_classes '7' \(expected '4'\)"
    ):
        pipeline.load_model(run)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    save_model(model_path(run, 2), model, metadata)
    with pytest.raises(UserError, match="NaN or infinite weights"):
        pipeline.load_model(run)


def test_a_missing_or_replaced_manifest_is_named(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path)
    config = (run / CONFIG_FILE).read_text()
    dataset = read_run_config(run / CONFIG_FILE).data.dataset
    (run / CONFIG_FILE).write_text(config.replace(dataset, str(tmp_path / "gone")))
    with pytest.raises(UserError, match="the run's dataset manifest is missing"):
        pipeline.load_model(run)
    shutil.copytree(dataset, tmp_path / "gone")
    manifest = tmp_path / "gone" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"seed":0', '"seed":1'))
    with pytest.raises(UserError, match="not the manifest the run was planned with"):
        pipeline.load_model(run)
