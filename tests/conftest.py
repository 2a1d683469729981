"""Shared fixtures: a tiny procedural dataset prepared once per test session."""

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.dataset_prepare import prepare
from pipeline.textures import generate

pytest_plugins = ["tests.condor_pool.fixtures"]


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 4 images of 128x128: enough for balanced local sets of a few dozen fragments."""
    return generate(
        tmp_path_factory.mktemp("source") / "textures",
        classes=4,
        images_per_class=4,
        size=128,
        seed=3,
        progress=False,
    )


@pytest.fixture(scope="session")
def tiny_dataset(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dataset") / "prepared"
    prepare(tiny_source, out, tile=32, overlap=0.5, holdout=0.25, seed=0, progress=False)
    return out


@pytest.fixture
def tiny_config(tiny_dataset: Path, tmp_path: Path) -> Callable[..., Path]:
    """Writes a small run config over the tiny dataset; keyword `table__key="value"` overrides."""

    def write(**overrides: str) -> Path:
        path = tmp_path / "tiny.toml"
        path.write_text(_config_text(tiny_dataset, overrides))
        return path

    return write


def _config_text(dataset: Path, overrides: dict[str, str]) -> str:
    lines = {
        "run": {"name": '"tiny"', "nodes": "3", "rounds": "2", "quorum": "1.0", "seed": "7"},
        "data": {
            "dataset": f'"{dataset}"',
            "local_train": "48",
            "local_test": "16",
            "heldout_test": "64",
        },
        "model": {"arch": '"smallcnn"'},
        "train": {"local_steps": "4", "batch_size": "16", "lr": "0.05"},
    }
    for dotted, value in overrides.items():
        table, key = dotted.split("__")
        lines.setdefault(table, {})[key] = value
    return "\n".join(
        f"[{table}]\n" + "\n".join(f"{k} = {v}" for k, v in keys.items()) + "\n"
        for table, keys in lines.items()
    )
