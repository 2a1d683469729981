"""Reading the run's resolved config inside a job, with nothing but the standard library."""

import tomllib
from pathlib import Path
from typing import Any

from node_payload.errors import UserError


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
