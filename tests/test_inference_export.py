"""`dagtrain export`: a loaded export gives the run's logits, in a Python that never imports
dagtrain, and carries the class names, input size, channels and normalisation."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pipeline
from node_payload.batches import to_tensor
from node_payload.common.errors import UserError
from node_payload.common.models import build_model
from pipeline.cli import main
from pipeline.dataset_prepare import prepare
from pipeline.inference.tiling import bands, check
from tests.inference_run import plan_run

# What a user without dagtrain runs: load the export, read its metadata, compute logits.
USER_SCRIPT = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file

fmt, exported, inputs, outputs = sys.argv[1:]
x = load_file(inputs)["x"]
if fmt == "torchscript":
    extra = {"dagtrain.json": ""}
    model = torch.jit.load(exported, _extra_files=extra)
    meta = json.loads(extra["dagtrain.json"])
elif fmt == "state_dict":
    import torchvision
    from safetensors import safe_open

    with safe_open(exported, "pt") as f:
        meta = json.loads(f.metadata()["dagtrain"])
    model = torchvision.models.get_model(meta["arch"], num_classes=len(meta["classes"]))
    model.load_state_dict(load_file(exported))
else:
    import onnxruntime

    session = onnxruntime.InferenceSession(exported)
    meta = json.loads(session.get_modelmeta().custom_metadata_map["dagtrain"])
    logits = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
if fmt != "onnx":
    with torch.no_grad():
        logits = model.eval()(x)
assert not {"pipeline", "node_payload", "aggregation"} & set(sys.modules), "dagtrain imported"
save_file({"logits": logits.contiguous()}, outputs, metadata={"meta": json.dumps(meta)})
"""


@pytest.fixture(scope="module")
def dataset(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "dataset"
    prepare(tiny_source, out, tile=32, overlap=0.5, holdout=0.25, progress=False)
    return out


@pytest.fixture(scope="module")
def run_dir(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return plan_run(tmp_path_factory.mktemp("smallcnn"), dataset)


def _fragments(run_dir: Path, tiny_source: Path) -> tuple[np.ndarray, torch.Tensor]:
    """Real inputs: an image's fragments as uint8, and as the model's input."""
    run = pipeline.load_model(run_dir)
    pixels = np.concatenate(
        list(bands(check(tiny_source / "cells" / "2.png", run.tiling), run.tiling, [0, 90]))
    )
    return pixels, to_tensor(pixels, run.image_size)


def _as_user(
    fmt: str, exported: Path, x: torch.Tensor, tmp_path: Path
) -> tuple[torch.Tensor, dict]:
    save_file({"x": x.contiguous()}, tmp_path / "x.safetensors")
    subprocess.run(
        [sys.executable, "-c", USER_SCRIPT, fmt, str(exported), "x.safetensors", "y.safetensors"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
        check=True,
    )
    with safe_open(str(tmp_path / "y.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    return load_file(tmp_path / "y.safetensors")["logits"], meta


def _run_logits(run_dir: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pipeline.load_model(run_dir).model(x)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_an_export_gives_the_run_s_logits_without_dagtrain(
    run_dir: Path, tiny_source: Path, tmp_path: Path, fmt: str
) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(out)]) == 0
    pixels, x = _fragments(run_dir, tiny_source)
    logits, meta = _as_user(fmt, out, x, tmp_path)
    torch.testing.assert_close(logits, _run_logits(run_dir, x), atol=1e-5, rtol=0)
    assert meta["classes"] == ["cells", "clouds", "fibres", "grain"]
    assert (meta["in_channels"], meta["image_size"], meta["tile"], meta["round"]) == (3, 32, 32, 1)
    # the normalisation it states is the one training used
    mean, std = torch.tensor(meta["mean"])[:, None, None], torch.tensor(meta["std"])[:, None, None]
    by_hand = (torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255 - mean) / std
    torch.testing.assert_close(by_hand, x, atol=1e-6, rtol=0)


def test_a_torchvision_state_dict_loads_into_torchvision_without_dagtrain(
    dataset: Path, tiny_source: Path, tmp_path: Path
) -> None:
    run_dir = plan_run(tmp_path, dataset, arch="resnet18")
    out = pipeline.export(run_dir, "state_dict", tmp_path / "resnet18.safetensors")
    assert out.read_bytes()[:2] != b"\x80\x04"  # safetensors, never a pickle
    _, x = _fragments(run_dir, tiny_source)
    logits, meta = _as_user("state_dict", out, x, tmp_path)
    torch.testing.assert_close(logits, _run_logits(run_dir, x), atol=1e-5, rtol=0)
    assert meta["arch"] == "resnet18" and meta["format"] == "dagtrain-export/1"


def test_a_smallcnn_state_dict_loads_into_dagtrain_s_network(
    run_dir: Path, tiny_source: Path, tmp_path: Path
) -> None:
    out = pipeline.export(run_dir, "state_dict", tmp_path / "m.safetensors", round=0)
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["dagtrain"])
    model = build_model(meta["arch"], len(meta["classes"]), meta["in_channels"])
    model.load_state_dict(load_file(out))
    _, x = _fragments(run_dir, tiny_source)
    with torch.no_grad():
        expected = pipeline.load_model(run_dir, round=0).model(x)
        torch.testing.assert_close(model.eval()(x), expected, atol=1e-5, rtol=0)
    assert meta["round"] == 0


def test_export_refuses_a_missing_package_an_output_in_the_run_and_an_unknown_format(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    with pytest.raises(UserError, match=r"needs the onnx package: pip install 'dagtrain\[onnx\]'"):
        pipeline.export(run_dir, "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(UserError, match="inside the run directory"):
        pipeline.export(run_dir, "torchscript", run_dir / "models" / "global_r001.safetensors")
    with pytest.raises(UserError, match="choose one of state_dict, torchscript, onnx"):
        pipeline.export(run_dir, "pickle", tmp_path / "m.pt")
