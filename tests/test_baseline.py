"""`dagtrain baseline`: the centralized model a user compares the federated run against."""

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from node_payload.common.manifest import Manifest
from node_payload.common.run_layout import HELDOUT_FILE
from pipeline import baseline, planner
from pipeline.baseline import (
    POOL_BYTES,
    default_steps,
    pool_size,
    read_fragments,
    run_baseline,
    training_pool,
)
from pipeline.cli import main
from pipeline.config import from_dict, load


def test_trains_on_the_tiny_dataset_and_beats_chance(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    out = tmp_path / "baseline"
    result = run_baseline(tiny_config(), out, steps=60, show_progress=False)
    assert result["steps"] == 60
    assert result["heldout_accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert [point["step"] for point in result["curve"]][-1] == 60
    assert json.loads((out / "baseline.json").read_text()) == result
    assert (out / "baseline.png").stat().st_size > 0


def test_scores_exactly_the_planners_heldout_set_and_trains_on_no_heldout_source(
    tiny_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config()
    run_dir = planner.plan_from_file(config, tmp_path / "run")
    planned = json.loads((run_dir / HELDOUT_FILE).read_text())["fragments"]
    reads: list[list[int]] = []

    def recording(manifest: Manifest, dataset_dir: Path, ids: list[int]) -> baseline.Pixels:
        reads.append(list(ids))
        return read_fragments(manifest, dataset_dir, ids)

    monkeypatch.setattr(baseline, "read_fragments", recording)
    run_baseline(config, tmp_path / "out", steps=2, show_progress=False)
    manifest = planner.make_plan(load(config)).manifest
    pool, heldout, votes = reads
    assert heldout == planned
    assert not any(manifest.sources[manifest.fragment(i).source].holdout for i in pool)
    assert all(manifest.sources[manifest.fragment(i).source].holdout for i in votes)


@pytest.mark.parametrize("seed", range(20))
def test_the_pool_is_class_balanced_and_drawn_from_every_training_source(
    tiny_dataset: Path, seed: int
) -> None:
    manifest = Manifest.load(tiny_dataset / "manifest.json")
    pool = training_pool(manifest, 402, seed)
    labels = Counter(manifest.fragment(i).label for i in pool)
    assert sorted(labels.values()) == [100, 100, 101, 101]
    assert len(set(pool)) == len(pool) == 402
    sources = {manifest.fragment(i).source for i in pool}
    training = {s for s, source in enumerate(manifest.sources) if not source.holdout}
    assert sources == training
    assert training_pool(manifest, 402, seed) == pool


def test_a_pool_larger_than_the_data_repeats_fragments_but_stays_balanced(
    tiny_dataset: Path,
) -> None:
    manifest = Manifest.load(tiny_dataset / "manifest.json")
    n = 2 * len(manifest)
    pool = training_pool(manifest, n, 0)
    assert len(pool) == n
    assert set(Counter(manifest.fragment(i).label for i in pool).values()) == {n // 4}


def test_the_pool_is_bounded_in_memory_however_many_steps(tiny_dataset: Path) -> None:
    manifest = Manifest.load(tiny_dataset / "manifest.json")
    channels = 1 if manifest.mode == "L" else 3
    assert pool_size(10, 16, manifest) == 160
    assert pool_size(10**9, 64, manifest) * manifest.tile**2 * channels <= POOL_BYTES


def _config(dataset: Path, **train: object) -> dict:
    return {
        "run": {"nodes": 3, "rounds": 5},
        "data": {"dataset": str(dataset), "local_train": 48},
        "train": {"batch_size": 16, **train},
    }


def test_default_steps_are_the_federated_runs_total(tiny_dataset: Path) -> None:
    assert default_steps(from_dict(_config(tiny_dataset, local_steps=4)).config) == 3 * 5 * 4
    # local_epochs: each node job's steps, as the node derives them (2 x 48 / 16 = 6)
    assert default_steps(from_dict(_config(tiny_dataset, local_epochs=2.0)).config) == 90
    raw = _config(tiny_dataset, local_steps=4) | {"async": {"updates": 7}}
    raw["run"]["mode"] = "async"
    assert default_steps(from_dict(raw).config) == 7 * 4


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, " ".join(err.split())


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_steps_that_are_not_positive_are_one_message(
    tiny_config: Callable[..., Path], capsys: pytest.CaptureFixture[str], steps: str
) -> None:
    code, err = _error(capsys, ["baseline", str(tiny_config()), "--steps", steps])
    assert code == 2
    assert f"--steps must be a positive number of SGD steps, not {steps}" in err


def test_steps_that_are_not_a_number_are_refused_by_the_parser(
    tiny_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["baseline", str(tiny_config()), "--steps", "many"])
    assert exit_.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_a_missing_dataset_is_one_message_naming_it_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.toml"
    config.write_text('[data]\ndataset = "nowhere"\n')
    code, err = _error(capsys, ["baseline", str(config), "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"no prepared dataset at {tmp_path / 'nowhere'}" in err
    assert "dagtrain prepare" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_config_is_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _error(capsys, ["baseline", str(tmp_path / "absent.toml")])
    assert (code, err) == (2, f"error: {tmp_path / 'absent.toml'}: config file not found")


def test_an_out_that_is_a_file_is_one_message(
    tiny_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "taken").write_text("")
    argv = ["baseline", str(tiny_config()), "--steps", "1", "--out", str(tmp_path / "taken")]
    code, err = _error(capsys, argv)
    assert code == 2
    assert f"--out {tmp_path / 'taken'}: not a folder" in err


def test_a_corrupt_shard_is_named_not_trained_on(
    tiny_dataset: Path,
    tiny_config: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dataset = shutil.copytree(tiny_dataset, tmp_path / "dataset")
    manifest = Manifest.load(dataset / "manifest.json")
    shard = dataset / manifest.shards[0]
    data = bytearray(shard.read_bytes())
    for i in range(0, len(data), 97):  # a flipped byte in every block
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    config = tiny_config(data__dataset=f'"{dataset}"')
    code, err = _error(capsys, ["baseline", str(config), "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"{shard}: block" in err and "does not match its hash" in err
    assert not (tmp_path / "out" / "baseline.json").exists()
