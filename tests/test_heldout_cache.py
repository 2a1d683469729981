"""The held-out caches in a run directory: fetched once, then used only while they hold exactly
the expected tensors; a corrupt or hostile cache is named and fetched again, never scored. And
the asynchronous report, which fetches them at the FINAL node."""

import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from aggregation.async_state import read_ledger, write_ledger
from aggregation.heldout import HeldOut, load_heldout
from aggregation.heldout_cache import BadCache, Expected, read_cache
from aggregation.report import write_report
from node_payload.common.errors import UserError
from node_payload.common.manifest import Manifest
from node_payload.common.run_config import RunConfig, read_run_config
from node_payload.common.run_layout import HELDOUT_CACHE, HELDOUT_IMAGES_CACHE, model_path
from node_payload.common.tensor_io import load_tensors, save_tensors
from pipeline.mirrors import serve
from pipeline.planner import plan_from_file


@pytest.fixture
def planned(tiny_config: Callable[..., Path], tmp_path: Path) -> Iterator[tuple[Path, RunConfig]]:
    run_dir = plan_from_file(tiny_config(), tmp_path / "run")
    config = read_run_config(run_dir / "config.toml")
    ports = [int(url.rsplit(":", 1)[1]) for url in config.data.mirrors]
    with serve(Path(config.data.dataset), ports):
        yield run_dir, config


def _manifest(config: RunConfig) -> Manifest:
    return Manifest.load(Path(config.data.dataset) / "manifest.json")


def _same(a: HeldOut, b: HeldOut) -> None:
    for name in ("x", "y", "image_x", "image_of", "image_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.classes == b.classes


def test_the_heldout_set_is_fetched_once_then_read_from_the_cache(tiny_config, tmp_path) -> None:
    run_dir = plan_from_file(tiny_config(), tmp_path / "run")
    config = read_run_config(run_dir / "config.toml")
    manifest = _manifest(config)
    ports = [int(url.rsplit(":", 1)[1]) for url in config.data.mirrors]
    with serve(Path(config.data.dataset), ports):
        fetched = load_heldout(run_dir, config, manifest, 0)
    # the mirrors are gone: only the caches can answer
    _same(load_heldout(run_dir, config, manifest, 0), fetched)
    size, channels = config.model.image_size, config.model.in_channels
    assert fetched.x.shape == (config.data.heldout_test, channels, size, size)
    assert len(fetched.image_x) == len(fetched.image_of) > len(fetched.image_y) > 0
    assert fetched.classes == manifest.classes


def _fragment_cases(x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[object, str]]:
    """name -> (what to write as the fragment cache, words the message must hold)."""
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    meta = {"format": "dagtrain-heldout/1"}
    return {
        "smaller tiles": (({"x": x[:, :, :8, :8].clone(), "y": y}, meta), "shape"),
        "fewer fragments": (({"x": x[1:].clone(), "y": y[1:].clone()}, meta), "shape"),
        "float64": (({"x": x.double(), "y": y}, meta), "torch.float64"),
        "a tensor renamed": (({"images": x, "y": y}, meta), "holds tensors ['images', 'y']"),
        "an extra tensor": (({"x": x, "y": y, "z": y.clone()}, meta), "holds tensors"),
        "labels out of range": (({"x": x, "y": y + 100}, meta), "differs from the labels"),
        "labels shifted": (
            ({"x": x, "y": (y + 1) % (int(y.max()) + 1)}, meta),
            "differs from the labels",
        ),
        "NaN pixels": (({"x": nan, "y": y}, meta), "NaN"),
        "another format": (({"x": x, "y": y}, {"format": "other/1"}), "metadata"),
        "pickle": (pickle.dumps({"x": x, "y": y}), "pickle"),
        "empty": (b"", "not a safetensors file"),
        "garbage": (b"\xff" * 64, "not a safetensors file"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "smaller tiles",
        "fewer fragments",
        "float64",
        "a tensor renamed",
        "an extra tensor",
        "labels out of range",
        "labels shifted",
        "NaN pixels",
        "another format",
        "pickle",
        "empty",
        "garbage",
        "truncated",
        "10 GB",
    ],
)
def test_a_bad_fragment_cache_is_named_and_fetched_again(planned, capsys, case: str) -> None:
    run_dir, config = planned
    manifest = _manifest(config)
    good = load_heldout(run_dir, config, manifest, 0)
    cache = run_dir / HELDOUT_CACHE
    if case == "truncated":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
        words = "not a safetensors file"
    elif case == "10 GB":
        os.truncate(cache, 10 * 2**30)  # sparse: nothing is written, nothing must be read
        words = "bytes, more than the"
    else:
        content, words = _fragment_cases(good.x, good.y)[case]
        if isinstance(content, bytes):
            cache.write_bytes(content)
        else:
            save_tensors(cache, *content)
    capsys.readouterr()

    _same(load_heldout(run_dir, config, manifest, 0), good)

    said = capsys.readouterr().out
    assert f"{cache}: not used (" in said and words in said and "fetching" in said
    tensors, _ = load_tensors(cache)
    assert torch.equal(tensors["x"], good.x) and torch.equal(tensors["y"], good.y)


@pytest.mark.parametrize("case", ["fewer fragments", "a tensor renamed", "other fragments"])
def test_a_bad_image_cache_is_named_and_fetched_again(planned, capsys, case: str) -> None:
    run_dir, config = planned
    manifest = _manifest(config)
    good = load_heldout(run_dir, config, manifest, 0)
    cache = run_dir / HELDOUT_IMAGES_CACHE
    tensors, meta = load_tensors(cache)
    if case == "fewer fragments":
        save_tensors(cache, {"x": good.image_x[:-1].clone()}, meta)
    elif case == "a tensor renamed":
        save_tensors(cache, {"images": good.image_x}, meta)
    else:  # the same number of tiles, cut for another choice of positions
        save_tensors(cache, tensors, {**meta, "fragments_sha256": "0" * 64})
    capsys.readouterr()

    _same(load_heldout(run_dir, config, manifest, 0), good)

    said = capsys.readouterr().out
    assert f"{cache}: not used (" in said
    assert torch.equal(load_tensors(cache)[0]["x"], good.image_x)


@pytest.mark.parametrize("kind", ["directory", "dangling symlink"])
def test_a_cache_path_that_is_no_file_is_refused_with_the_fix(planned, kind: str) -> None:
    run_dir, config = planned
    cache = run_dir / HELDOUT_CACHE
    if kind == "directory":
        cache.mkdir()
    else:
        cache.symlink_to(run_dir / "nowhere")
    with pytest.raises(UserError, match="is not a regular file; remove it"):
        load_heldout(run_dir, config, _manifest(config), 0)


def test_the_cache_check_reads_nothing_past_the_expected_size(tmp_path: Path) -> None:
    expected = Expected({"x": ((2, 3), torch.float32)}, {"format": "f"}, {})
    path = tmp_path / "cache.safetensors"
    save_tensors(path, {"x": torch.zeros(2, 3)}, {"format": "f"})
    assert torch.equal(read_cache(path, expected)["x"], torch.zeros(2, 3))
    save_tensors(path, {"x": torch.zeros(2, 3)}, {"format": "f", "pad": "p" * (2 << 20)})
    with pytest.raises(BadCache, match="more than the"):
        read_cache(path, expected)


def test_an_asynchronous_report_scores_images_in_every_evaluation(tiny_config, tmp_path) -> None:
    run_dir = plan_from_file(tiny_config(run__mode='"async"'), tmp_path / "run")
    config = read_run_config(run_dir / "config.toml")
    shutil.copy(model_path(run_dir, 0), model_path(run_dir, 1))
    version = {"version": 1, "at": 130.0, "updates": [], "staleness": [], "clipped": {}}
    ledger = read_ledger(run_dir)
    write_ledger(run_dir, replace(ledger, version=1, started_at=100.0, versions=[version]))
    ports = [int(url.rsplit(":", 1)[1]) for url in config.data.mirrors]
    with serve(Path(config.data.dataset), ports):
        report = write_report(run_dir, config, 0)
    rows = report["evaluations"]
    assert [(r["version"], r["seconds"]) for r in rows] == [(0, 0.0), (1, 30.0)]
    for row in rows:
        assert 0.0 <= row["image_accuracy"] <= 1.0
        assert sum(map(sum, row["image_confusion"])) == row["heldout_images"] > 0
        assert set(row["recall"]) == set(report["classes"])
    assert report["final_image_accuracy"] == rows[-1]["image_accuracy"]
    assert report["final_confusion"] == rows[-1]["confusion"]
    for name in ("accuracy.png", "confusion.png"):
        assert (run_dir / name).read_bytes().startswith(b"\x89PNG")
