"""Self-checkpointing node jobs: a job that checkpoints and is restarted, or is evicted and
resumes from its last checkpoint, makes the update an uninterrupted job makes, bit for bit."""

import json
from pathlib import Path

import pytest
import torch

from node_payload.checkpoint import Checkpoints, CheckpointTaken
from node_payload.checkpoint_files import FILES, STATE_FILE
from tests.checkpoint_training import IDENTITY, STEPS, AtSteps, train, until_done


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_job_restarted_after_every_checkpoint_ends_as_an_uninterrupted_one(tmp_path: Path):
    plain, plain_state = train(None)
    result, state, restarts = until_done(lambda: AtSteps(tmp_path, {3, 7, 8, 11}))
    assert restarts == 4
    assert _same(state, plain_state)
    assert result == plain


def test_an_evicted_job_resumes_from_its_last_checkpoint_and_ends_the_same(tmp_path: Path):
    """Checkpoint at step 4, then killed at step 9 (what it did since is lost): the restart,
    elsewhere, goes on from step 4."""
    plain, plain_state = train(None)
    with pytest.raises(CheckpointTaken):
        train(AtSteps(tmp_path, {4}))
    machine_b = tmp_path / "b"
    machine_b.mkdir()
    for name in FILES:  # what the spool hands the next machine
        (machine_b / name).write_bytes((tmp_path / name).read_bytes())
    evicted = AtSteps(machine_b, {9})  # stands for the work done until the eviction
    with pytest.raises(CheckpointTaken):
        train(evicted)
    for name in FILES:
        (machine_b / name).write_bytes((tmp_path / name).read_bytes())
    resumed = AtSteps(machine_b, set())
    result, state = train(resumed)
    assert _same(state, plain_state) and result == plain
    assert [int(r["step"]) for r in resumed.history.resumed] == [4]
    assert [int(w["step"]) for w in resumed.history.written] == [4]


def test_a_checkpoint_is_not_taken_without_progress_since_the_last(tmp_path: Path):
    """An interval of 0 checkpoints after every step, never twice at the same step."""
    plain, plain_state = train(None)
    result, state, restarts = until_done(lambda: Checkpoints(tmp_path, IDENTITY, 0))
    assert restarts == STEPS - 1
    assert _same(state, plain_state) and result == plain
    history = json.loads((tmp_path / STATE_FILE).read_text())["history"]
    assert [w["step"] for w in history["written"]] == list(range(1, STEPS))
