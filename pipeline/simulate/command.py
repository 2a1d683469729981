"""`dagtrain simulate CONFIG [--machines N] [--pool MODEL.toml]`."""

import io
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr
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
    said: set[str] = set()
    results = []
    for variant in variants(q):
        with _notes_once(said):
            results.append(simulate_variant(config_path, overrides, variant, pool, seed))
    return results


@contextmanager
def _notes_once(said: set[str]) -> Iterator[None]:
    """What planning a variant prints, less the lines an earlier variant printed: the variants
    share the config, so its dataset and mirror notes would otherwise come three times."""
    printed = io.StringIO()
    try:
        with redirect_stderr(printed):
            yield
    finally:
        for line in printed.getvalue().splitlines(keepends=True):
            if line not in said:
                said.add(line)
                sys.stderr.write(line)


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
