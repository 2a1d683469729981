"""Hostile model deltas, cached models and cached payloads: a node job trains only on the exact
model its pointer names and runs only the payload its launcher names, whatever a mirror or the
machine's cache holds.

A delta whose model is not the pointer's, one of another run or base version, or one with
positions out of range or values of another dtype or shape is refused with one line and the
model is fetched whole; a cached model or payload of other bytes is named, removed and fetched
again; a pointer's delta field that is not one is refused naming the field."""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from node_payload import model_cache
from node_payload.common import tensor_io
from node_payload.common.errors import UserError
from node_payload.common.model_delta import BadDelta, DeltaIdentity, apply_delta
from node_payload.common.model_pointer import read_pointer
from node_payload.common.run_layout import (
    MODELS_DIR,
    PAYLOAD_DIR,
    PAYLOAD_NAME,
    model_delta_path,
    model_path,
    model_pointer_path,
)
from node_payload.model_fetch import model_file
from tests.model_versions import config_of, models_copy, planned_with_version_1, served
from tests.test_model_delta import _launch


@pytest.fixture
def run_dir(tiny_config: Callable[..., Path], tmp_path: Path) -> Path:
    return planned_with_version_1(tiny_config, tmp_path)


def _cache_version_0(run_dir: Path, data: bytes | None = None) -> Path:
    config = config_of(run_dir)
    folder = model_cache.run_folder(config.data.node_cache, config.run.run_id)
    model_cache.keep(folder, 0, model_path(run_dir, 0).read_bytes() if data is None else data)
    return folder


def _get(run_dir: Path, pointer: Path, out: Path):
    config = config_of(run_dir)
    mirrors = list(config.data.mirrors)
    return model_file(pointer, config.run.run_id, mirrors, 0, config.data.node_cache, out)


def _published_delta(run_dir: Path, tmp_path: Path, edit: Callable[[dict, dict], None]) -> Path:
    """Mirrors' models/ whose delta of version 1 is edited (tensors, metadata) and a pointer that
    names the edited file by its size and sha256, as a faulty publisher would write it."""
    models = models_copy(run_dir, tmp_path / "served")
    path = models / model_delta_path(run_dir, 1).name
    tensors, metadata = tensor_io.load_tensors(path)
    edit(tensors, metadata)
    tensor_io.save_tensors(path, tensors, metadata)
    pointer = json.loads(model_pointer_path(run_dir, 1).read_text())
    data = path.read_bytes()
    pointer["delta"] |= {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (tmp_path / "global.json").write_text(json.dumps(pointer))
    return models


def _first_changed(tensors: dict) -> str:
    """The first changed tensor's values with more than one position."""
    return next(k for k in sorted(tensors) if k.endswith("::val") and len(tensors[k]) > 1)


def _other_values(tensors: dict, metadata: dict) -> None:
    name = _first_changed(tensors)
    tensors[name] = tensors[name] + 1


def _out_of_range(tensors: dict, metadata: dict) -> None:
    idx = _first_changed(tensors).replace("::val", "::idx")
    tensors[idx] = tensors[idx].clone()
    tensors[idx][-1] = 2**30


def _descending(tensors: dict, metadata: dict) -> None:
    idx = _first_changed(tensors).replace("::val", "::idx")
    tensors[idx] = tensors[idx].flip(0).contiguous()


def _float64_values(tensors: dict, metadata: dict) -> None:
    name = _first_changed(tensors)
    tensors[name] = tensors[name].double()


def _one_value_short(tensors: dict, metadata: dict) -> None:
    name = _first_changed(tensors)
    tensors[name] = tensors[name][:-1].contiguous()


def _int64_positions(tensors: dict, metadata: dict) -> None:
    idx = _first_changed(tensors).replace("::val", "::idx")
    tensors[idx] = tensors[idx].long()


def _unknown_tensor(tensors: dict, metadata: dict) -> None:
    tensors["evil::idx"] = torch.zeros(1, dtype=torch.int32)
    tensors["evil::val"] = torch.zeros(1)


def _meta(key: str, value: str) -> Callable[[dict, dict], None]:
    return lambda tensors, metadata: metadata.update({key: value})


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (_other_values, "the model it makes has sha256"),
        (_meta("run_id", "another-run"), "it is not the delta the pointer names (metadata run_id)"),
        (_meta("base_version", "5"), "(metadata base_version)"),
        (_meta("sha256", "0" * 64), "(metadata sha256)"),
        (_out_of_range, "positions not ascending within the tensor's"),
        (_descending, "positions not ascending within the tensor's"),
        (_float64_values, "torch.float64"),
        (_one_value_short, "not torch.float32"),
        (_int64_positions, "not 1-D int32"),
        (_unknown_tensor, "tensor 'evil' is not in the model"),
    ],
)
def test_a_delta_that_is_not_the_pointers_model_is_refused_and_the_model_fetched_whole(
    run_dir: Path, tmp_path: Path, capsys, edit: Callable[[dict, dict], None], why: str
) -> None:
    models = _published_delta(run_dir, tmp_path, edit)
    _cache_version_0(run_dir)
    with served(run_dir, models):
        got = _get(run_dir, tmp_path / "global.json", tmp_path / "job")
    assert got.how.startswith("whole: its delta was refused: ") and why in got.how, got.how
    assert "fetched whole, not by delta: its delta was refused: " in capsys.readouterr().err
    assert got.path.read_bytes() == model_path(run_dir, 1).read_bytes()  # never the delta's
    assert got.moved.from_mirrors.model_in == model_path(run_dir, 1).stat().st_size


def test_a_mirror_serving_another_delta_than_the_pointers_is_passed_over(
    run_dir: Path, tmp_path: Path, caplog
) -> None:
    models = models_copy(run_dir, tmp_path / "served")
    path = models / model_delta_path(run_dir, 1).name
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    _cache_version_0(run_dir)
    with served(run_dir, models):
        got = _get(run_dir, model_pointer_path(run_dir, 1), tmp_path / "job")
    assert got.how.startswith("whole: no mirror served its delta")
    assert got.path.read_bytes() == model_path(run_dir, 1).read_bytes()


def test_a_cached_model_of_other_bytes_is_named_removed_and_not_used(
    run_dir: Path, tmp_path: Path
) -> None:
    folder = _cache_version_0(run_dir, data=b"not the model of version 0")
    with served(run_dir):
        got = _get(run_dir, model_pointer_path(run_dir, 1), tmp_path / "job")
    assert got.how.startswith("whole: the cached version 0 has sha256 ")
    assert got.how.endswith("not the pointer's " + got.how.split("pointer's ")[1])
    assert not (folder / model_path(run_dir, 0).name).exists()
    assert got.path.read_bytes() == model_path(run_dir, 1).read_bytes()


def test_a_delta_for_the_wrong_base_bytes_is_refused_before_it_is_applied(
    run_dir: Path, tmp_path: Path
) -> None:
    config = config_of(run_dir)
    pointer = read_pointer(model_pointer_path(run_dir, 1), config.run.run_id, 2)
    assert pointer.delta is not None
    identity = DeltaIdentity(config.run.run_id, 0, 1, pointer.delta.base_sha256, pointer.sha256)
    other_base = bytearray(model_path(run_dir, 0).read_bytes())
    other_base[-1] ^= 1
    with pytest.raises(BadDelta, match="the cached base is not the version the delta applies"):
        apply_delta(bytes(other_base), model_delta_path(run_dir, 1), identity)


def _edit_pointer(key: str, value: object) -> Callable[[dict], None]:
    return lambda doc: doc["delta"].update({key: value})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_edit_pointer("base_version", 0.0), "delta base_version 0.0, expected 0"),
        (_edit_pointer("base_version", 3), "delta base_version 3, expected 0"),
        (_edit_pointer("path", "published/x/delta_r001.safetensors"), "delta path 'published/x"),
        (_edit_pointer("bytes", -1), "delta bytes -1 is not a size"),
        (_edit_pointer("base_sha256", "AB" * 32), "delta base_sha256 'ABAB"),
        (lambda doc: doc["delta"].pop("sha256"), "delta: expected null or the fields"),
        (lambda doc: doc.update(delta=[1]), "delta: expected null or the fields path"),
        (lambda doc: doc.update(version=0), "delta base_version 0, expected -1"),
    ],
)
def test_a_pointers_delta_that_is_not_one_is_refused_naming_the_field(
    run_dir: Path, tmp_path: Path, edit: Callable[[dict], None], message: str
) -> None:
    doc = json.loads(model_pointer_path(run_dir, 1).read_text())
    edit(doc)
    if doc["version"] == 0:
        doc["path"] = doc["path"].replace("r001", "r000")
    pointer = tmp_path / "global.json"
    pointer.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="not a model pointer of this run: ") as err:
        read_pointer(pointer, config_of(run_dir).run.run_id, 2)
    assert message in str(err.value)


def test_a_cached_payload_of_other_bytes_is_named_removed_and_fetched_again(
    run_dir: Path, tmp_path: Path
) -> None:
    payload = (run_dir / PAYLOAD_DIR / PAYLOAD_NAME).read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    cached = tmp_path / "cache" / "payloads" / f"{digest}.pyz"
    cached.parent.mkdir(parents=True, mode=0o700)
    cached.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: it would run nothing of ours
    with served(run_dir):
        done = _launch(run_dir, "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: dagtrain-node"), done.stderr
    assert f"payload: the cached {cached} has sha256 " in done.stderr
    assert f"not the run's {digest[:12]}...; fetched again" in done.stderr
    assert cached.read_bytes() == payload


def test_a_mirror_serving_another_payload_is_passed_over(run_dir: Path, tmp_path: Path) -> None:
    models = models_copy(run_dir, tmp_path / "served")
    (models.parent / PAYLOAD_DIR / PAYLOAD_NAME).write_bytes(b"#!/usr/bin/env python3\nbad\n")
    config = config_of(run_dir)
    with served(run_dir, models):  # every mirror serves the wrong payload
        done = _launch(run_dir, "--help")
    assert done.returncode == 75, done.stderr
    assert done.stderr.count("bytes of sha256 ") == 2 * len(config.data.mirrors)
    assert "payload: no mirror served published/" in done.stderr
    assert not list((tmp_path / "cache" / "payloads").iterdir())
    with served(run_dir, run_dir / MODELS_DIR):
        assert _launch(run_dir, "--help").returncode == 0
