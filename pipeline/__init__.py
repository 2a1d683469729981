"""Planner, Python API, CLI, local runner and embedded FTP mirrors.

The Python API: `load_config`, `make_plan`, `Plan`, `write`, `run_local`, `submit`, `status`.
Imported lazily, so `dagtrain status` does not pay for importing torch.
"""

from importlib import import_module
from typing import Any

_API = {
    "load_config": ("pipeline.config", "load"),
    "make_plan": ("pipeline.planner", "make_plan"),
    "Plan": ("pipeline.planner", "Plan"),
    "write": ("pipeline.planner", "write"),
    "run_local": ("pipeline.local_run", "run_local"),
    "submit": ("pipeline.submission", "submit"),
    "status": ("pipeline.submission", "status"),
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    module, attribute = _API[name]
    return getattr(import_module(module), attribute)
