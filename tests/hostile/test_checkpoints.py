"""Hostile checkpoints: files that come back to a node job as its checkpoint but are another
run's, round's, node's or job's, or are corrupt, are never loaded. The job says why in one line
on stderr and starts afresh, so its update is the uninterrupted job's."""

import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from node_payload.checkpoint import CheckpointTaken
from node_payload.checkpoint_files import STATE_FILE, TENSORS_FILE
from node_payload.common.tensor_io import load_tensors, save_tensors
from tests.checkpoint_training import IDENTITY, AtSteps, train


@pytest.fixture(scope="module")
def uninterrupted() -> tuple[object, dict[str, torch.Tensor]]:
    return train(None)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The job's own checkpoint after step 4, written once for every case to spoil a copy of."""
    folder = tmp_path_factory.mktemp("checkpoint")
    with pytest.raises(CheckpointTaken):
        train(AtSteps(folder, {4}))
    return folder


def _state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def _write_state(folder: Path, state: dict) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state))


def _restate(folder: Path, **changes: object) -> None:
    _write_state(folder, {**_state(folder), **changes})


def _retensor(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change the tensors and record their new sha256, as a forger who knows the format would."""
    tensors, metadata = load_tensors(folder / TENSORS_FILE)
    change(tensors)
    save_tensors(folder / TENSORS_FILE, tensors, metadata)
    digest = hashlib.sha256((folder / TENSORS_FILE).read_bytes()).hexdigest()
    _restate(folder, tensors_sha256=digest)


def _flip_a_byte(folder: Path) -> None:
    data = bytearray((folder / TENSORS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (folder / TENSORS_FILE).write_bytes(bytes(data))


def _pickle_with_its_hash(folder: Path) -> None:
    (folder / TENSORS_FILE).write_bytes(pickle.dumps({"model.fc.weight": [1.0]}, protocol=4))
    _restate(
        folder, tensors_sha256=hashlib.sha256((folder / TENSORS_FILE).read_bytes()).hexdigest()
    )


def _shape(tensors: dict[str, torch.Tensor]) -> None:
    name = next(n for n in tensors if n.startswith("model.") and tensors[n].dim() == 2)
    tensors[name] = torch.zeros(3, 3)


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    name = next(n for n in tensors if n.startswith("model.") and tensors[n].is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))


def _not_a_permutation(tensors: dict[str, torch.Tensor]) -> None:
    tensors["sampler.order"] = torch.zeros_like(tensors["sampler.order"])


def _extra_tensor(tensors: dict[str, torch.Tensor]) -> None:
    tensors["optim.999.momentum_buffer"] = torch.zeros(1)


def _bad_generator(tensors: dict[str, torch.Tensor]) -> None:
    tensors["rng.generator"] = torch.zeros(7, dtype=torch.uint8)


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "another run": (lambda f: _restate(f, run_id="run-b"), "it is from run_id 'run-b'"),
    "another round": (lambda f: _restate(f, round=3), "it is from round 3"),
    "another node": (lambda f: _restate(f, node=0), "it is from node 0"),
    "another job": (lambda f: _restate(f, job="cd" * 32), "it is from job"),
    "not json": (lambda f: (f / STATE_FILE).write_text('{"format": "dagtrain-chec'), "is not JSON"),
    "another format": (lambda f: _restate(f, format="x/9"), "is not a dagtrain-checkpoint/1"),
    "state only": (lambda f: (f / TENSORS_FILE).unlink(), "must both be there"),
    "tensors only": (lambda f: (f / STATE_FILE).unlink(), "must both be there"),
    "a flipped byte": (_flip_a_byte, "does not match the sha256"),
    "a pickle": (_pickle_with_its_hash, "pickles are refused"),
    "a step past the job": (lambda f: _restate(f, step=99), "step 99 is outside"),
    "a negative cursor": (lambda f: _restate(f, cursor=-1), "must be non-negative integers"),
    "an infinite loss": (lambda f: _restate(f, total_loss=float("inf")), "finite"),
    "a bad random state": (lambda f: _restate(f, python_random=[3, [1], None]), "python_random"),
    "a history that is not one": (
        lambda f: _restate(f, history={"written": "x", "resumed": []}),
        "history.written",
    ),
    "a random state past 32 bits": (
        lambda f: _restate(f, python_random=[3, [2**80] * 624 + [624], None]),
        "too large",
    ),
    "a huge state": (lambda f: (f / STATE_FILE).write_text(" " * (2 << 20)), "larger than"),
    "a wrong shape": (lambda f: _retensor(f, _shape), "is torch.float32[3, 3]"),
    "a nan weight": (lambda f: _retensor(f, _nan), "is not finite"),
    "a shuffled order": (lambda f: _retensor(f, _not_a_permutation), "not a permutation"),
    "an unknown tensor": (lambda f: _retensor(f, _extra_tensor), "unknown tensor"),
    "a bad generator": (lambda f: _retensor(f, _bad_generator), "random generator's state"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_checkpoint_is_refused_in_one_line_and_the_job_starts_afresh(
    case: str, uninterrupted, written: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in (STATE_FILE, TENSORS_FILE):
        shutil.copy(written / name, tmp_path / name)
    hostile, words = CASES[case]
    hostile(tmp_path)
    capsys.readouterr()
    restarted = AtSteps(tmp_path, set())
    result, state = train(restarted)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("checkpoint not loaded, starting afresh: ")
    assert words in lines[0]
    assert restarted.history.resumed == []
    plain, plain_state = uninterrupted
    assert result == plain and all(torch.equal(state[k], plain_state[k]) for k in plain_state)


def test_a_job_identity_differs_by_its_config_and_model_bytes(tmp_path: Path) -> None:
    config, model = tmp_path / "config.toml", tmp_path / "model.safetensors"
    config.write_text("a")
    model.write_bytes(b"m")
    first = type(IDENTITY).of("run-a", 2, 1, [config, model])
    model.write_bytes(b"n")
    assert first != type(IDENTITY).of("run-a", 2, 1, [config, model])
    model.write_bytes(b"m")
    assert first == type(IDENTITY).of("run-a", 2, 1, [config, model])
