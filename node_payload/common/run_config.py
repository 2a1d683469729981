"""Reading the run's resolved config inside a job, with nothing but the standard library."""

import math
import tomllib
from pathlib import Path
from typing import Any

from node_payload.common.errors import UserError


def read_run_config(path: Path) -> dict[str, Any]:
    """The planner already validated the config; a job only checks that it can read it."""
    try:
        config = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{path}: cannot read the run config: {exc}") from None
    for table in ("run", "data", "model", "train", "server"):
        if table not in config:
            raise UserError(f"{path}: the run config has no [{table}] table; plan the run again")
    return config


def update_budget(config: dict[str, Any]) -> int:
    """Updates an asynchronous run applies before its lanes stop: by default the synchronous
    run's work (nodes x rounds)."""
    run = config["run"]
    return config["async"]["updates"] or run["nodes"] * run["rounds"]


def schedule_length(config: dict[str, Any]) -> int:
    """Steps of the learning-rate schedule: rounds, or the model versions an asynchronous run
    makes (one per `buffer` updates), so both modes decay over the same work."""
    if config["run"]["mode"] != "async":
        return config["run"]["rounds"]
    return math.ceil(update_budget(config) / config["async"]["buffer"])
