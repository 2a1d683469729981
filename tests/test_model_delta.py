"""A published model as a delta to the version before: the node that holds that version fetches
only the delta and trains on exactly the published bytes; and the node jobs' payload launcher,
which runs the payload from the machine's cache or the mirrors."""

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from node_payload import model_cache
from node_payload.common.model_delta import DeltaIdentity, apply_delta, write_delta
from node_payload.common.model_pointer import read_pointer
from node_payload.common.run_layout import (
    CONFIG_FILE,
    PAYLOAD_DIR,
    PAYLOAD_NAME,
    model_delta_path,
    model_path,
    model_pointer_path,
)
from node_payload.model_fetch import model_file
from pipeline.payload_zip import LAUNCHER
from tests.model_versions import config_of, planned_with_version_1, publish_version_1, served


@pytest.fixture
def run_dir(tiny_config: Callable[..., Path], tmp_path: Path) -> Path:
    return planned_with_version_1(tiny_config, tmp_path)


def _get(run_dir: Path, out: Path, version: int = 1):
    config = config_of(run_dir)
    return model_file(
        model_pointer_path(run_dir, version),
        config.run.run_id,
        list(config.data.mirrors),
        0,
        config.data.node_cache,
        out,
    )


def test_a_delta_rebuilds_the_model_byte_for_byte(run_dir: Path, tmp_path: Path) -> None:
    base, model = model_path(run_dir, 0), model_path(run_dir, 1)
    identity = DeltaIdentity(
        "r", 0, 1, *(hashlib.sha256(p.read_bytes()).hexdigest() for p in (base, model))
    )
    size = write_delta(base, model, tmp_path / "d.safetensors", identity)
    assert (
        apply_delta(base.read_bytes(), tmp_path / "d.safetensors", identity) == model.read_bytes()
    )
    assert size < model.stat().st_size / 4  # 2% of the values moved: positions and values


def test_the_pointer_names_the_delta_only_when_it_is_smaller(run_dir: Path) -> None:
    config = config_of(run_dir)
    pointer = read_pointer(model_pointer_path(run_dir, 1), config.run.run_id, 2)
    assert pointer.delta is not None and pointer.delta.base_version == 0
    assert pointer.delta.bytes == model_delta_path(run_dir, 1).stat().st_size
    assert read_pointer(model_pointer_path(run_dir, 0), config.run.run_id, 2).delta is None
    publish_version_1(run_dir, changed=1.0)  # every value moved: the delta is the larger
    assert read_pointer(model_pointer_path(run_dir, 1), config.run.run_id, 2).delta is None
    assert not model_delta_path(run_dir, 1).exists()


def test_a_node_holding_the_version_before_fetches_only_the_delta(
    run_dir: Path, tmp_path: Path
) -> None:
    with served(run_dir):
        first = _get(run_dir, tmp_path / "job0", version=0)
        second = _get(run_dir, tmp_path / "job1")
    assert first.how == "whole" and second.how == "delta"
    assert second.path.read_bytes() == model_path(run_dir, 1).read_bytes()
    delta = model_delta_path(run_dir, 1).stat().st_size
    moved = second.moved
    assert moved.from_mirrors.model_in == 0 and moved.from_mirrors.model_delta_in == delta
    assert moved.on_machine.model_in == model_path(run_dir, 0).stat().st_size
    assert sorted(p.name for p in (tmp_path / "job1").iterdir()) == [second.path.name]


def test_a_node_without_the_version_before_fetches_the_model_whole_and_says_why(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with served(run_dir):
        got = _get(run_dir, tmp_path / "job")
    assert got.how == "whole: version 0 is not in this machine's cache"
    assert "model version 1: fetched whole, not by delta: version 0" in capsys.readouterr().err
    assert got.path.read_bytes() == model_path(run_dir, 1).read_bytes()
    assert got.moved.from_mirrors.model_delta_in == 0
    config = config_of(run_dir)
    folder = model_cache.run_folder(config.data.node_cache, config.run.run_id)
    assert (folder / model_path(run_dir, 1).name).read_bytes() == got.path.read_bytes()


def _launch(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """A node job's start through the payload's launcher, as on an execute machine."""
    config = str(run_dir / CONFIG_FILE)
    return subprocess.run(
        [sys.executable, str(run_dir / LAUNCHER), "node", "--config", config, *args],
        cwd=run_dir,
        capture_output=True,
        text=True,
    )


def test_the_launcher_fetches_the_payload_once_then_runs_it_from_the_cache(
    run_dir: Path, tmp_path: Path
) -> None:
    payload = (run_dir / PAYLOAD_DIR / PAYLOAD_NAME).read_bytes()
    cached = tmp_path / "cache" / "payloads" / f"{hashlib.sha256(payload).hexdigest()}.pyz"
    assert (run_dir / LAUNCHER).stat().st_size < len(payload) / 10
    with served(run_dir):
        assert _launch(run_dir, "--help").stdout.startswith("usage: dagtrain-node")
    assert cached.read_bytes() == payload
    done = _launch(run_dir, "--help")  # no mirror now: the cache serves it
    assert done.returncode == 0 and done.stdout.startswith("usage: dagtrain-node"), done.stderr
    assert done.stderr == ""


def test_a_node_job_counts_the_launcher_and_the_payload_it_fetched(
    run_dir: Path, tmp_path: Path
) -> None:
    """A whole node job through the launcher: round 0's model, the payload from the mirrors;
    then the same job again finds both in the machine's cache."""
    out = [tmp_path / "n0", tmp_path / "n0-again"]
    args = ["--model", str(model_pointer_path(run_dir, 0)), "--round", "0", "--node", "0"]
    with served(run_dir):
        for folder in out:
            done = _launch(run_dir, *args, "--out", str(folder))
            assert done.returncode == 0, done.stderr
    first, again = (json.loads((f / "metrics.json").read_text())["bytes"] for f in out)
    launcher = (run_dir / LAUNCHER).stat().st_size + (run_dir / CONFIG_FILE).stat().st_size
    payload = (run_dir / PAYLOAD_DIR / PAYLOAD_NAME).stat().st_size
    for record in (first, again):
        assert record["through_submit_host"]["payload_in"] == launcher
    assert first["from_mirrors"]["payload_in"] == payload and first["on_machine"]["payload_in"] == 0
    assert again["from_mirrors"]["payload_in"] == 0 and again["on_machine"]["payload_in"] == payload
