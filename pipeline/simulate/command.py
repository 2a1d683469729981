"""`dagtrain simulate CONFIG [--machines N] [--pool MODEL.toml]`."""

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from . import display, pool_model
from .variants import quorum_to_compare, simulate_variant, variants


def pool_for(pool_path: Path | None, machines: int | None) -> pool_model.PoolModel:
    """The pool model in the file (or the default one), with --machines over its count."""
    pool = pool_model.load(pool_path)
    return pool if machines is None else pool.with_machines(machines)


def simulate_config(
    config_path: Path,
    pool: pool_model.PoolModel,
    overrides: Sequence[str] = (),
    quorum: float | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Simulate the config as sync, sync with a quorum and async on the pool model."""
    q = quorum_to_compare(config_path, overrides, quorum)
    return [simulate_variant(config_path, overrides, v, pool, seed) for v in variants(q)]


def run(
    config_path: Path,
    overrides: Sequence[str],
    pool_path: Path | None,
    machines: int | None,
    quorum: float | None,
    seed: int,
    out: Path,
    console: Console,
) -> list[dict[str, Any]]:
    pool = pool_for(pool_path, machines)
    results = simulate_config(config_path, pool, overrides, quorum, seed)
    display.show(results, str(pool_path or "default pool model"), console)
    out.mkdir(parents=True, exist_ok=True)
    display.write_json(results, asdict(pool), out / "simulate.json")
    display.plot(results, out / "simulate.png")
    console.print(f"wrote {out / 'simulate.json'} and {out / 'simulate.png'}")
    return results
