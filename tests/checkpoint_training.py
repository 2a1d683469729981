"""A small node training, interrupted at chosen steps, for the checkpoint tests."""

import time
from collections.abc import Callable
from pathlib import Path

import torch

from node_payload.checkpoint import Checkpoints, CheckpointTaken, JobIdentity
from node_payload.common.models import build_model
from node_payload.sgd import Sgd
from node_payload.train import LocalResult, Schedule, train_local

STEPS = 12
IDENTITY = JobIdentity("run-a", 2, 1, "ab" * 32)


class AtSteps(Checkpoints):
    """Checkpoints due after the chosen steps (numbered from the job's start), not by time."""

    def __init__(self, directory: Path, at: set[int], identity: JobIdentity = IDENTITY) -> None:
        super().__init__(directory, identity, interval_s=0)
        self.at = at
        self.calls = 0

    def due(self) -> bool:
        self.calls += 1
        resumed = self.history.resumed
        return (int(resumed[-1]["step"]) if resumed else 0) + self.calls in self.at


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.rand(40, 3, 16, 16, generator=generator), torch.arange(40) % 4


def train(checkpoints: Checkpoints | None) -> tuple[LocalResult, dict[str, torch.Tensor]]:
    """One process's training of the same job: the same model, data and seed every time."""
    torch.manual_seed(11)  # the process's global random state, as a fresh job starts with
    model = build_model("smallcnn", 4, 3, seed=3)
    x, y = data()
    result = train_local(
        model, x, y, steps=STEPS, batch_size=8, schedule=Schedule(0.05, "cosine", 100, 5),
        first_step=20, momentum=0.9, nesterov=True, weight_decay=5e-4, augment=True, seed=7,
        checkpoints=checkpoints,
    )  # fmt: skip
    return result, model.state_dict()


def until_done(make: Callable[[], Checkpoints]) -> tuple[LocalResult, dict[str, torch.Tensor], int]:
    """Restart the job (a new Checkpoints, as a new process) until it finishes."""
    for restarts in range(STEPS + 1):
        try:
            result, state = train(make())
        except CheckpointTaken:
            continue
        return result, state, restarts
    raise AssertionError("the job never finished")


def steps_in(seconds: float, image_size: int = 32, batch_size: int = 16) -> int:
    """How many SGD steps a tiny node job takes in `seconds` on this machine now (one thread,
    as a one-CPU slot), so a test's jobs train for a few checkpoint intervals, not hundreds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model("smallcnn", 4, 3, seed=0)
        optimizer = Sgd(model.parameters(), 0.01, 0.9, False, 0.0)  # the trainers' own
        x, y = torch.rand(batch_size, 3, image_size, image_size), torch.arange(batch_size) % 4
        started, steps = time.monotonic(), 0
        while steps < 5 or time.monotonic() - started < 1.0:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            steps += 1
        return max(1, round(seconds * steps / (time.monotonic() - started)))
    finally:
        torch.set_num_threads(threads)
