"""The runs `dagtrain simulate` compares: the config in synchronous rounds waiting for every node,
synchronous with a quorum, and asynchronous lanes, each planned by the real planner."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import load

from .engine import simulate
from .pool_model import PoolModel
from .summary import summarise
from .workload import plan_workload

DEFAULT_QUORUM = 0.8  # when the config waits for every node, the quorum to compare with


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...]


def variants(quorum: float) -> list[Variant]:
    return [
        Variant("sync", ("run.mode=sync", "run.quorum=1.0")),
        Variant(f"sync, quorum {quorum:g}", ("run.mode=sync", f"run.quorum={quorum!r}")),
        Variant("async", ("run.mode=async",)),
    ]


def simulate_variant(
    config_path: Path,
    overrides: Sequence[str],
    variant: Variant,
    pool: PoolModel,
    seed: int,
) -> dict[str, Any]:
    """Plan one variant of the config and simulate its DAG on the pool."""
    work = plan_workload(load(config_path, [*overrides, *variant.overrides]))
    trace = simulate(work, pool, seed)
    return summarise(variant.label, trace, work, pool.machines.count)


def quorum_to_compare(config_path: Path, overrides: Sequence[str], quorum: float | None) -> float:
    """--quorum, else the config's own quorum when it has one below 1, else DEFAULT_QUORUM."""
    if quorum is not None:
        return quorum
    own = load(config_path, overrides).config.run.quorum
    return own if own < 1 else DEFAULT_QUORUM
