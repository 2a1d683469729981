"""The asynchronous run's ledger on the submit host: one JSON file changed only under a lock.

DAGMan runs POST scripts (and PRE scripts) of different lanes at the same time; each one takes
the lock, reads the ledger, writes model files, then replaces the ledger atomically. The ledger
is the commit point: a model version exists for the run once the ledger names it, so a kill at
any moment leaves either the old state or the new one, and a rerun redoes the same step.

Standard library only: PRE scripts import this without torch, so they start in milliseconds.
"""

import fcntl
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from node_payload.common.atomic_file import write_text
from node_payload.common.errors import UserError
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import ASYNC_LOCK, ASYNC_STATE


def lane_length(config: RunConfig) -> int:
    """Jobs written per lane: a fast lane may take up to 4x its share of the budget, so that
    the budget is spent by whichever lanes are fast, while the DAG stays O(budget) in size."""
    budget, lanes = config.update_budget, config.run.nodes
    return config.async_.lane_jobs or min(budget, 4 * math.ceil(budget / lanes))


def job_key(lane: int, step: int) -> str:
    return f"{lane}:{step}"


def lane_step(key: str) -> tuple[int, int]:
    """The (lane, step) a job key names."""
    lane, step = key.split(":")
    return int(lane), int(step)


@dataclass
class Ledger:
    """accepted: updates counted against the budget; claims: jobs handed a model and not yet back (key -> version and time); done: every job
    that is finished for good, with what became of it; buffer: accepted updates not yet applied
    (buffer > 1); versions: when each version was made and from which updates."""

    run_id: str
    version: int = 0
    started_at: float | None = None
    accepted: int = 0  # updates taken into the buffer or a version: what the budget counts
    claims: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: dict[str, str] = field(default_factory=dict)
    buffer: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)

    def in_flight(self) -> int:
        return len(self.claims)

    def elapsed(self, now: float | None = None) -> float:
        return 0.0 if self.started_at is None else (now or time.time()) - self.started_at


def state_path(run_dir: Path) -> Path:
    return run_dir / ASYNC_STATE


def read_ledger(run_dir: Path) -> Ledger:
    path = state_path(run_dir)
    try:
        return Ledger(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; this is not an asynchronous run directory") from None
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); restore it from a backup") from None


def write_ledger(run_dir: Path, ledger: Ledger) -> None:
    write_text(state_path(run_dir), json.dumps(asdict(ledger), indent=1) + "\n")


@contextmanager
def locked(run_dir: Path) -> Iterator[Ledger]:
    """Hold the run's lock while the body reads and changes the ledger; saved on success only."""
    with open(run_dir / ASYNC_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            ledger = read_ledger(run_dir)
            yield ledger
            write_ledger(run_dir, ledger)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
