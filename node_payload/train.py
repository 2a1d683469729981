"""Local training of the global model copy, and evaluation shared with the aggregator."""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from node_payload.batches import augment as augment_batch
from node_payload.checkpoint import Checkpoints, CheckpointTaken, Progress
from node_payload.common.run_config import RunConfig, TrainTable
from node_payload.sgd import Sgd


@dataclass(frozen=True)
class LocalResult:
    loss: float
    accuracy: float
    steps: int


@dataclass(frozen=True)
class Schedule:
    """The learning rate over the run's global steps, as one machine training alone would see it:
    a linear warm-up, then constant or a cosine decay to 0 at the last step.

    A node job takes its local steps at global steps first_step .. first_step + steps - 1, where
    first_step is its place in the run (round, or model version when asynchronous) times its
    steps, so every job of a run walks the same curve and the last round ends near 0.
    """

    base_lr: float
    kind: str  # "constant" or "cosine"
    total_steps: int
    warmup_steps: int = 0

    @classmethod
    def for_run(cls, train: TrainTable, job_steps: int, positions: int) -> "Schedule":
        """A run of `positions` places (rounds or versions) of `job_steps` steps each."""
        total = max(1, job_steps * positions)
        return cls(train.lr, train.lr_schedule, total, round(train.warmup * total))

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.base_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def steps_for(local_steps: int, local_epochs: float, samples: int, batch_size: int) -> int:
    if local_steps:
        return local_steps
    return max(1, math.ceil(local_epochs * samples / batch_size))


class Sampler:
    """Index batches over shuffled epochs of n samples; an epoch's last partial batch is left
    out (the planner warns about a local_train that is not a multiple of batch_size). Its
    position (the epoch's order and the cursor in it) lives in a Progress, so a checkpoint
    can carry it."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, at: Progress) -> None:
        self.n = n
        self.batch_size = batch_size
        self.generator = generator
        self.at = at
        if len(at.order) == 0:
            at.order = torch.randperm(n, generator=generator)

    def next(self) -> torch.Tensor:
        at = self.at
        if at.cursor + self.batch_size > self.n:
            at.order = torch.randperm(self.n, generator=self.generator)
            at.cursor = 0
        index = at.order[at.cursor : at.cursor + self.batch_size]
        at.cursor += self.batch_size
        return index


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The Sampler's batches, endlessly (the centralized baseline's)."""
    sampler = Sampler(n, batch_size, generator, Progress())
    while True:
        yield sampler.next()


@contextmanager
def channels_last(model: nn.Module) -> Iterator[None]:
    """Trains in channels-last layout, in which torch's CPU convolutions and pooling take a step
    in less time (benchmarks/bench_train_step.py); the weights return to the default layout
    after, so what is saved, subtracted or compressed is laid out as before."""
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    schedule: Schedule,
    first_step: int,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    augment: bool,
    seed: int,
    checkpoints: Checkpoints | None = None,
) -> LocalResult:
    """SGD with (Nesterov) momentum over shuffled epochs of the local set, at the schedule's
    rates for global steps first_step onwards; seeded so a node is reproducible. With
    `checkpoints`, it starts from the job's checkpoint if there is one, and writes one and
    raises CheckpointTaken once their interval has passed (between two steps)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = Sgd(model.parameters(), schedule.lr(first_step), momentum, nesterov, weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    at = Progress()
    sampler = Sampler(len(y), batch_size, generator, at)
    if checkpoints is not None:
        checkpoints.resume(model, optimizer, generator, at, steps, len(y))
    start = at.step  # a checkpoint needs a step of progress in this process
    with channels_last(model):
        while at.step < steps:
            if checkpoints is not None and at.step > start and checkpoints.due():
                checkpoints.save(model, optimizer, generator, at)
                raise CheckpointTaken(f"checkpoint written at step {at.step} of {steps}")
            optimizer.lr = schedule.lr(first_step + at.step)
            index = sampler.next()
            inputs = augment_batch(x[index], generator) if augment else x[index]
            logits = model(inputs)
            loss = loss_fn(logits, y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            at.total_loss += loss.item() * len(index)
            at.correct += int((logits.argmax(1) == y[index]).sum())
            at.seen += len(index)
            at.step += 1
    return LocalResult(at.total_loss / max(at.seen, 1), at.correct / max(at.seen, 1), steps)


def train_job(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: RunConfig,
    position: int,
    seed: int,
    checkpoints: Checkpoints | None = None,
) -> tuple[LocalResult, Schedule, int]:
    """A node job's training: its steps at its place in the run's schedule (the round, or the
    model's version when asynchronous); the result, the schedule and the first global step."""
    train = config.train
    steps = steps_for(train.local_steps, train.local_epochs, len(y), train.batch_size)
    schedule = Schedule.for_run(train, steps, config.schedule_length)
    result = train_local(
        model,
        x,
        y,
        steps=steps,
        batch_size=train.batch_size,
        schedule=schedule,
        first_step=position * steps,
        momentum=train.momentum,
        nesterov=train.nesterov,
        weight_decay=train.weight_decay,
        augment=train.augment,
        seed=seed,
        checkpoints=checkpoints,
    )
    return result, schedule, position * steps


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (BatchNorm uses its running statistics)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        total_loss += float(loss_fn(logits, y[start : start + batch_size]))
        correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
    return total_loss / max(len(y), 1), correct / max(len(y), 1)


def update_tensors(
    global_state: dict[str, torch.Tensor], local_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """global - local for floating tensors (weights and BatchNorm statistics); integer buffers as is."""
    update = {}
    for name, before in global_state.items():
        after = local_state[name].detach()
        if before.is_floating_point():
            update[name] = (before - after).contiguous()
        else:
            update[name] = after.clone().contiguous()
    return update
