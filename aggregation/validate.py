"""Checks one node's update before it may touch the global model.

A node is a remote machine: a stale, corrupt or diverged update must be refused with a reason the
user can act on, not averaged in. The file is streamed one tensor at a time (memory O(model)).
A sparse update (node_payload.sparse_update) is checked without densifying it: its packed
stream (its declared size), positions (in range, unique), values and statistics (finite) when
it is opened, its tensor names and shapes against the model, and its norm from the sent values.
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from node_payload import sparse_update, tensor_io

_UINT = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Validation:
    """Outcome for one update; reason is a sentence for the log line 'node N: rejected: ...'."""

    ok: bool
    reason: str = ""
    norm: float = math.nan
    samples: int = 0


def validate_update(
    path: Path,
    global_state: Mapping[str, torch.Tensor],
    round_: int,
    node: int,
    bound: float,
    expected: Mapping[str, int] | None = None,
) -> Validation:
    """Check metadata, tensor names, dtypes, shapes, finiteness and the L2 norm of the update.

    The metadata must say round_, node and base version round_ (a synchronous round), unless
    expected gives other values (an asynchronous job: its step, lane and the version it got).
    """
    want = {"round": round_, "node": node, "base_version": round_, **(expected or {})}
    try:
        with sparse_update.open_update(path) as update:
            problem = _check_metadata(update.metadata, want)
            if problem:
                return Validation(False, problem)
            problem = _check_names(update.names, global_state)
            if problem:
                return Validation(False, problem)
            squares = 0.0
            for name, expected in global_state.items():
                if update.is_sparse(name):
                    problem = _check_sparse(name, update.shape(name), expected)
                    tensor = update.values(name)
                else:
                    tensor = update.get(name)
                    problem = _check_tensor(name, tensor, expected)
                if problem:
                    return Validation(False, problem)
                if tensor.is_floating_point():
                    squares += torch.linalg.vector_norm(tensor, dtype=torch.float64).item() ** 2
            samples = int(update.metadata["samples"])
    except tensor_io.BadTensorFile as err:
        return Validation(False, str(err))
    except OSError as err:
        return Validation(False, f"cannot read the update: {err}")
    norm = math.sqrt(squares)
    if norm > bound:
        return Validation(False, f"update norm {norm:.4g} exceeds the bound {bound:.4g}", norm)
    return Validation(True, norm=norm, samples=samples)


def _check_metadata(metadata: Mapping[str, str], expected: Mapping[str, int]) -> str:
    fmt = metadata.get("format")
    if fmt != tensor_io.UPDATE_FORMAT:
        return f"metadata format is {fmt!r}, expected {tensor_io.UPDATE_FORMAT!r}"
    for key, want in expected.items():
        value = metadata.get(key)
        if value != str(want):
            return f"metadata {key} is {value!r}, expected {want}"
    samples = metadata.get("samples")
    if samples is None or not _UINT.fullmatch(samples) or int(samples) == 0:
        return f"metadata samples is {samples!r}, expected a positive integer"
    return ""


def _check_names(names: list[str], global_state: Mapping[str, torch.Tensor]) -> str:
    present = set(names)
    missing = [name for name in global_state if name not in present]
    if missing:
        return f"tensor {missing[0]!r} is missing ({len(missing)} missing in total)"
    extra = sorted(present - global_state.keys())
    if extra:
        return f"unexpected tensor {extra[0]!r} ({len(extra)} not in the global model)"
    return ""


def _check_sparse(name: str, shape: tuple[int, ...], expected: torch.Tensor) -> str:
    """Sparse tensors densify to float32 of their declared shape; their values were checked."""
    if expected.dtype != torch.float32:
        return f"tensor {name!r} is sent sparse (float32), expected {expected.dtype}"
    if shape != tuple(expected.shape):
        return f"tensor {name!r} has shape {shape}, expected {tuple(expected.shape)}"
    return ""


def _check_tensor(name: str, tensor: torch.Tensor, expected: torch.Tensor) -> str:
    if tensor.dtype != expected.dtype:
        return f"tensor {name!r} has dtype {tensor.dtype}, expected {expected.dtype}"
    if tensor.shape != expected.shape:
        return f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected.shape)}"
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        return f"tensor {name!r} contains NaN or Inf"
    return ""
