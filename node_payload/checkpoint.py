"""A node job's checkpoint, for HTCondor's self-checkpointing (`checkpoint_exit_code`).

A job training longer than `[train] checkpoint_s` writes its training state beside its outputs
and exits with CHECKPOINT_EXIT. HTCondor copies the files named by `transfer_checkpoint_files`
to the access point's spool and restarts the job in the same sandbox; a job evicted later gets
them back with its input files on whatever machine it lands. The restarted job loads them and
goes on from the same step with the same model, optimizer, batch order and random states, so
its update is bit-identical to an uninterrupted job's.

The files come back from the spool, a place the job does not own: a checkpoint is only loaded
if it names this run, round, node and job (the config and model bytes it trained from) and its
tensors match the sha256 it records; anything else is refused in one line on stderr and the job
starts afresh. Tensors are safetensors, the rest JSON: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from node_payload.checkpoint_files import FILES, STATE_FILE, TENSORS_FILE
from node_payload.common import atomic_file
from node_payload.common.tensor_io import BadTensorFile, load_tensors, save_tensors
from node_payload.sgd import Sgd

FORMAT = "dagtrain-checkpoint/1"
MOMENTUM = "momentum_buffer"  # a parameter's buffer is the tensor optim.INDEX.momentum_buffer
_MAX_STATE_BYTES = 1 << 20  # the JSON holds scalars, a random state and a short history


class CheckpointTaken(Exception):
    """The job wrote its checkpoint and must exit with CHECKPOINT_EXIT to be restarted."""


class _Refused(ValueError):
    """Why a checkpoint on disk is not this job's, or not sound."""


@dataclass(frozen=True)
class JobIdentity:
    """Which job a checkpoint belongs to, the same for every restart and DAGMan retry of it."""

    run_id: str
    round: int
    node: int
    job: str  # sha256 over the config and model files the job trains from

    @classmethod
    def of(cls, run_id: str, round_: int, node: int, inputs: list[Path]) -> JobIdentity:
        digest = hashlib.sha256()
        for path in inputs:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return cls(run_id, round_, node, digest.hexdigest())

    def mismatch(self, state: dict[str, Any]) -> str:
        """What differs between this job and the one a checkpoint names ('' if none)."""
        theirs = {name: state.get(name) for name in ("run_id", "round", "node", "job")}
        for name, mine in self.__dict__.items():
            if theirs[name] != mine:
                return f"it is from {name} {theirs[name]!r}, this job's is {mine!r}"
        return ""


@dataclass
class Progress:
    """Where training is: steps taken, the epoch's batch order and position, the running loss
    and accuracy sums, and the training seconds behind them (over every restart)."""

    step: int = 0
    order: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    cursor: int = 0
    total_loss: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0


@dataclass
class History:
    """What a job's checkpoints did, carried from one restart to the next for its metrics."""

    written: list[dict[str, float]] = field(default_factory=list)  # at, step, seconds
    resumed: list[dict[str, float]] = field(default_factory=list)  # at, step, seconds

    def to_json(self) -> dict[str, Any]:
        return {"written": self.written, "resumed": self.resumed}


class Checkpoints:
    """One node job's checkpoints in `directory` (its sandbox), every `interval_s` seconds of
    training in one process."""

    def __init__(self, directory: Path, identity: JobIdentity, interval_s: float) -> None:
        self.directory = directory
        self.identity = identity
        self.interval_s = interval_s
        self.started = time.monotonic()
        self.restored_seconds = 0.0
        self.history = History()

    def seconds(self) -> float:
        """Training seconds so far, those restored from a checkpoint included."""
        return self.restored_seconds + time.monotonic() - self.started

    def resume(
        self,
        model: nn.Module,
        optimizer: Sgd,
        generator: torch.Generator,
        progress: Progress,
        steps: int,
        samples: int,
    ) -> None:
        """Load this job's checkpoint into the training state, if there is a sound one."""
        if not any((self.directory / name).exists() for name in FILES):
            return
        try:
            state, tensors = self._read(model, optimizer, steps, samples)
        except _Refused as refused:
            print(f"checkpoint not loaded, starting afresh: {refused}", file=sys.stderr)
            return
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer.load_momentum_buffers(_momentum_buffers(tensors))
        generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        random.setstate(_python_random_state(state["python_random"]))
        progress.step = state["step"]
        progress.order = tensors["sampler.order"]
        progress.cursor = state["cursor"]
        progress.total_loss = state["total_loss"]
        progress.correct = state["correct"]
        progress.seen = state["seen"]
        progress.seconds = self.restored_seconds = state["seconds"]
        self.started = time.monotonic()
        self.history = History(state["history"]["written"], state["history"]["resumed"])
        self.history.resumed.append(
            {"at": time.time(), "step": progress.step, "seconds": progress.seconds}
        )
        print(f"resumed from checkpoint at step {progress.step} of {steps}", file=sys.stderr)

    def due(self) -> bool:
        return time.monotonic() - self.started >= self.interval_s

    def save(
        self,
        model: nn.Module,
        optimizer: Sgd,
        generator: torch.Generator,
        progress: Progress,
    ) -> None:
        """Write the checkpoint (tensors, then the state naming their hash), each atomically."""
        progress.seconds = self.seconds()
        tensors = {f"model.{k}": v.detach() for k, v in model.state_dict().items()}
        for index, buffer in optimizer.momentum_buffers().items():
            tensors[f"optim.{index}.{MOMENTUM}"] = buffer.detach()
        tensors["rng.generator"] = generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["sampler.order"] = progress.order
        path = self.directory / TENSORS_FILE
        self.directory.mkdir(parents=True, exist_ok=True)
        save_tensors(path, tensors, {"format": FORMAT})
        self.history.written.append(
            {"at": time.time(), "step": progress.step, "seconds": progress.seconds}
        )
        state = {
            "format": FORMAT,
            **self.identity.__dict__,
            "step": progress.step,
            "cursor": progress.cursor,
            "total_loss": progress.total_loss,
            "correct": progress.correct,
            "seen": progress.seen,
            "seconds": progress.seconds,
            "python_random": random.getstate(),
            "history": self.history.to_json(),
            "tensors_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
        atomic_file.write_text(self.directory / STATE_FILE, json.dumps(state) + "\n")

    def _read(
        self, model: nn.Module, optimizer: Sgd, steps: int, samples: int
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The checkpoint's state and tensors, once every check has passed."""
        state_path, tensors_path = self.directory / STATE_FILE, self.directory / TENSORS_FILE
        if not state_path.is_file() or not tensors_path.is_file():
            raise _Refused(f"{STATE_FILE} and {TENSORS_FILE} must both be there")
        if state_path.stat().st_size > _MAX_STATE_BYTES:
            raise _Refused(f"{STATE_FILE} is larger than {_MAX_STATE_BYTES} bytes")
        try:
            state = json.loads(state_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Refused(f"{STATE_FILE} is not JSON: {exc}") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise _Refused(f"{STATE_FILE} is not a {FORMAT} checkpoint")
        mismatch = self.identity.mismatch(state)
        if mismatch:
            raise _Refused(f"not this job's checkpoint: {mismatch}")
        _check_scalars(state, steps)
        if hashlib.sha256(tensors_path.read_bytes()).hexdigest() != state["tensors_sha256"]:
            raise _Refused(f"{TENSORS_FILE} does not match the sha256 in {STATE_FILE}")
        try:
            tensors, _ = load_tensors(tensors_path)
        except BadTensorFile as exc:
            raise _Refused(str(exc)) from None
        _check_tensors(tensors, model, optimizer, state, samples)
        return state, tensors


def _check_scalars(state: dict[str, Any], steps: int) -> None:
    ints = ("step", "cursor", "correct", "seen")
    if not all(type(state.get(name)) is int and state[name] >= 0 for name in ints):
        raise _Refused(f"{', '.join(ints)} must be non-negative integers")
    for name in ("total_loss", "seconds"):
        if type(state.get(name)) not in (int, float) or not 0 <= state[name] < float("inf"):
            raise _Refused(f"{name} must be a finite non-negative number")
    if not 0 < state["step"] < steps:
        raise _Refused(f"step {state['step']} is outside this job's 1 to {steps - 1}")
    if not isinstance(state.get("tensors_sha256"), str):
        raise _Refused("no tensors_sha256")
    _check_history(state.get("history"))
    try:
        _python_random_state(state.get("python_random"))
    except (TypeError, ValueError, OverflowError) as exc:
        raise _Refused(f"python_random is not a random state: {exc}") from None


def _check_history(history: Any) -> None:
    """Lists of {at, step, seconds} numbers, as `save` writes them."""
    if not isinstance(history, dict):
        raise _Refused("history must be an object")
    for kind in ("written", "resumed"):
        entries = history.get(kind)
        if not isinstance(entries, list) or not all(
            isinstance(e, dict)
            and set(e) == {"at", "step", "seconds"}
            and all(type(v) in (int, float) for v in e.values())
            for e in entries
        ):
            raise _Refused(f"history.{kind} must be a list of {{at, step, seconds}} numbers")


def _python_random_state(value: Any) -> tuple[Any, ...]:
    """random.getstate() as JSON wrote it (lists for tuples), checked as random.setstate does."""
    if not isinstance(value, list) or len(value) != 3 or not isinstance(value[1], list):
        raise ValueError("expected [version, [625 integers], gauss_next]")
    version, internal, gauss = value
    if not all(type(v) is int for v in internal) or len(internal) != 625:
        raise ValueError("expected 625 integers")
    if gauss is not None and type(gauss) is not float:
        raise ValueError("gauss_next must be null or a number")
    state = (version, tuple(internal), gauss)
    random.Random().setstate(state)  # raises on anything random.setstate would refuse
    return state


def _check_tensors(
    tensors: dict[str, torch.Tensor],
    model: nn.Module,
    optimizer: Sgd,
    state: dict[str, Any],
    samples: int,
) -> None:
    """Every tensor this job needs, of the shape and type its own, and nothing else."""
    expected = {f"model.{k}": v for k, v in model.state_dict().items()}
    params = optimizer.params
    optim_names = {k for k in tensors if k.startswith("optim.")}
    for name in optim_names:
        _, index, kind = name.split(".", 2)
        if not index.isdigit() or int(index) >= len(params) or kind != MOMENTUM:
            raise _Refused(f"{TENSORS_FILE} holds an unknown tensor {name!r}")
        expected[name] = params[int(index)]
    known = set(expected) | {"rng.generator", "rng.torch", "sampler.order"}
    if set(tensors) != known:
        odd = sorted(set(tensors) ^ known)[:3]
        raise _Refused(f"{TENSORS_FILE} does not hold this job's tensors (e.g. {odd})")
    for name, like in expected.items():
        got = tensors[name]
        if got.shape != like.shape or got.dtype != like.dtype:
            raise _Refused(
                f"{name} is {got.dtype}{list(got.shape)}, not {like.dtype}{list(like.shape)}"
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise _Refused(f"{name} is not finite")
    rng = torch.Generator()
    for name, size in (("rng.generator", rng.get_state().numel()),
                       ("rng.torch", torch.get_rng_state().numel())):  # fmt: skip
        if tensors[name].dtype != torch.uint8 or tensors[name].shape != (size,):
            raise _Refused(f"{name} is not a random generator's state")
        try:
            rng.set_state(tensors[name])
        except RuntimeError as exc:
            raise _Refused(f"{name} is not a random generator's state: {exc}") from None
    order = tensors["sampler.order"]
    if order.dtype != torch.int64 or order.dim() != 1:
        raise _Refused("sampler.order is not a batch order")
    if len(order) != samples or not torch.equal(order.sort().values, torch.arange(samples)):
        raise _Refused("sampler.order is not a permutation of the local set")
    if state["cursor"] > len(order):
        raise _Refused(f"cursor {state['cursor']} is past the order's {len(order)} samples")


def _momentum_buffers(tensors: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """The optimizer's buffers from the checkpoint (`optim.INDEX.momentum_buffer`, checked)."""
    return {
        int(name.split(".")[1]): value
        for name, value in tensors.items()
        if name.startswith("optim.")
    }
