"""A finished run's model, with everything needed to use it: the resolved config, the dataset
manifest (tile, stride, margin, channels, class names) and the weights of one global model.

A run directory may come from anywhere, so each file is checked before use and any problem is
one UserError naming the file and the fix.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from node_payload.common.errors import UserError
from node_payload.common.manifest import Manifest
from node_payload.common.model_file import load_model as load_model_file
from node_payload.common.run_config import RunConfig, read_run_config
from node_payload.common.run_layout import CONFIG_FILE, MODELS_DIR, model_path
from node_payload.common.tensor_io import MODEL_FORMAT, BadTensorFile, read_metadata
from pipeline.inference.tiling import Tiling

_MODEL_FILE = re.compile(r"global_r(\d{3,})\.safetensors")


@dataclass(frozen=True)
class RunModel:
    """One global model of a run, in eval mode, and how its inputs were made."""

    run_dir: Path
    path: Path  # the model file
    version: int  # the round (or asynchronous version) that produced it
    config: RunConfig
    manifest: Manifest
    model: nn.Module

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    @property
    def tiling(self) -> Tiling:
        return Tiling.of(self.manifest)

    @property
    def image_size(self) -> int:
        return self.config.model.image_size

    @property
    def channels(self) -> int:
        return self.config.model.in_channels


def model_versions(run_dir: Path) -> list[int]:
    """The versions of the global models in RUN_DIR/models, in order."""
    folder = run_dir / MODELS_DIR
    found = (_MODEL_FILE.fullmatch(p.name) for p in folder.iterdir()) if folder.is_dir() else ()
    return sorted(int(m.group(1)) for m in found if m)


def _version(run_dir: Path, round_: int | None) -> int:
    versions = model_versions(run_dir)
    if not versions:
        raise UserError(
            f"{run_dir / MODELS_DIR}: no global model (global_rNNN.safetensors); is {run_dir} "
            "a run directory? Plan one with `dagtrain plan` and train it with `dagtrain run`"
        )
    if round_ is None:
        if versions[-1] == 0:
            raise UserError(
                f"{run_dir}: no trained model yet, only the initial {model_path(run_dir, 0).name}; "
                f"train it first (dagtrain run {run_dir}), or pass --round 0 for the untrained one"
            )
        return versions[-1]
    if round_ not in versions:
        raise UserError(
            f"{model_path(run_dir, round_)}: no such model; --round may be one of "
            f"{', '.join(map(str, versions))}"
        )
    return round_


def _manifest(run_dir: Path, config: RunConfig) -> Manifest:
    """The dataset manifest the run was planned with (its sha256 is in config.toml)."""
    path = Path(config.data.dataset) / "manifest.json"
    if not path.is_file():
        raise UserError(
            f"{path}: the run's dataset manifest is missing; images are cut as that dataset's "
            f"were, so copy the dataset's manifest.json back there (the {run_dir / CONFIG_FILE} "
            "key [data] dataset names its folder)"
        )
    manifest = Manifest.load(path)
    if manifest.digest() != config.data.manifest_sha256:
        raise UserError(
            f"{path}: not the manifest the run was planned with (its sha256 differs from "
            f"[data] manifest_sha256 in {run_dir / CONFIG_FILE}); the dataset was prepared "
            "again since: restore the run's dataset"
        )
    return manifest


def _check_metadata(path: Path, config: RunConfig, classes: int) -> None:
    """The file must be this run's model: refuse before building any network from it."""
    try:
        metadata = read_metadata(path)
    except BadTensorFile as exc:
        raise UserError(f"{exc}; the model file is damaged: pick another with --round") from None
    expected = {
        "format": MODEL_FORMAT,
        "arch": config.model.arch,
        "num_classes": str(classes),
        "in_channels": str(config.model.in_channels),
        "image_size": str(config.model.image_size),
    }
    wrong = [
        f"{k} {metadata.get(k)!r} (expected {v!r})"
        for k, v in expected.items()
        if metadata.get(k) != v
    ]
    if wrong:
        raise UserError(
            f"{path}: not a model of this run: {', '.join(wrong)}; pick another with --round"
        )


def load_model(run_dir: Path, round: int | None = None) -> RunModel:
    """The run's global model after `round` rounds (or versions); by default the last one."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(
            f"{run_dir}: not a run directory (no {CONFIG_FILE}); give the folder `dagtrain plan` "
            "wrote"
        )
    config = read_run_config(run_dir / CONFIG_FILE)
    manifest = _manifest(run_dir, config)
    version = _version(run_dir, round)
    path = model_path(run_dir, version)
    _check_metadata(path, config, len(manifest.classes))
    try:
        model, _ = load_model_file(path)
    except BadTensorFile as exc:
        raise UserError(f"{exc}; the model file is damaged: pick another with --round") from None
    if not all(
        torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()
    ):
        raise UserError(
            f"{path}: the model holds NaN or infinite weights; pick another with --round"
        )
    return RunModel(run_dir, path, version, config, manifest, model.eval())


def check_output(run_dir: Path, path: Path) -> Path:
    """An output path outside the run directory: nothing written here may replace a run's file."""
    path = Path(path).resolve()
    if path.is_relative_to(run_dir):
        raise UserError(
            f"{path}: inside the run directory {run_dir}; write outputs elsewhere, so that no "
            "file of the run can be overwritten"
        )
    return path
