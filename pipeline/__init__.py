"""Planner, Python API, CLI, local runner and embedded FTP mirrors.

The Python API: `load_config`, `make_plan`, `Plan`, `write`, `run_local`, `submit`, `status`, and
for a trained run `load_model`, `predict`, `evaluate`, `export`. Imported lazily, so
`dagtrain status` does not pay for importing torch.
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
    "load_model": ("pipeline.inference.run_model", "load_model"),
    "predict": ("pipeline.inference.predict", "predict"),
    "evaluate": ("pipeline.inference.evaluate", "evaluate"),
    "export": ("pipeline.inference.export", "export"),
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    module, attribute = _API[name]
    return getattr(import_module(module), attribute)
