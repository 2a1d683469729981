"""Checks one node's update before it may touch the global model.

A node is a remote machine: a stale, corrupt, diverged or hostile update must be refused with a
reason the user can act on, not averaged in. The file is streamed one tensor at a time (memory
O(model)). A sparse update (node_payload.common.sparse_update) is checked without densifying it: its
packed stream (its declared size, at most what the model's tensors can need), positions (in
range, unique), values and statistics (finite) when it is opened, its tensor names and shapes
against the model, and its norm from the sent values. A quantised update (fp16, int8:
node_payload.common.quantised_update) has its scales checked when it is opened and is then
read as float32 and checked like a dense one. BatchNorm statistics and counters are
checked against the model the job started from (aggregation.buffers); the claimed sample count
against the plan (aggregation.job_plan), digit by digit, so no claim is too large to compare.
"""

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from aggregation.buffers import check_integer, check_statistics, is_mean, is_variance
from aggregation.job_plan import JobPlan
from node_payload.common import sparse_update, tensor_io

_UINT = re.compile(r"[0-9]+")
_BYTES_PER_VALUE = 8  # the most a packed value takes: a 5-byte position and 2 bytes, or an int64


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
    *,
    plan: JobPlan,
    base: Mapping[str, torch.Tensor] | None = None,
) -> Validation:
    """Check the file, metadata, tensor names, dtypes, shapes, finiteness, statistics, counters
    and the L2 norm of the update.

    The metadata must say round_, node and base version round_ (a synchronous round), unless
    expected gives other values (an asynchronous job: its step, lane and the version it got).
    base holds the statistics and integer tensors of the model the job started from (default:
    global_state, as in a synchronous round).
    """
    want = {"round": round_, "node": node, "base_version": round_, **(expected or {})}
    base = global_state if base is None else base
    problem = check_file(path)
    if problem:
        return Validation(False, problem)
    most = _BYTES_PER_VALUE * sum(t.numel() for t in global_state.values())
    try:
        with sparse_update.open_update(path, most) as update:
            problem = _check_metadata(update.metadata, want, plan.samples)
            if problem:
                return Validation(False, problem)
            problem = _check_names(update.names, global_state)
            if problem:
                return Validation(False, problem)
            squares = 0.0
            statistics: dict[str, torch.Tensor] = {}
            for name, reference in global_state.items():
                if update.is_sparse(name):
                    problem = _check_sparse(name, update.shape(name), reference)
                    tensor = update.values(name)
                else:
                    tensor = update.get(name)
                    problem = _check_tensor(name, tensor, reference)
                    if not problem and not tensor.is_floating_point():
                        problem = check_integer(name, tensor, base[name], plan.steps)
                if problem:
                    return Validation(False, problem)
                if is_mean(name) or is_variance(name):
                    sent = update.get(name) if update.is_sparse(name) else tensor
                    statistics[name] = base[name].double() - sent.double()
                    del sent  # memory O(tensor): nothing read stays alive past its turn
                if tensor.is_floating_point():
                    squares += torch.linalg.vector_norm(tensor, dtype=torch.float64).item() ** 2
            samples = int(update.metadata["samples"])
    except tensor_io.BadTensorFile as err:
        return Validation(False, str(err))
    except OSError as err:
        return Validation(False, f"cannot read the update: {err}")
    problem = check_statistics(statistics, base)
    if problem:
        return Validation(False, problem)
    norm = math.sqrt(squares)
    if norm > bound:
        return Validation(False, f"update norm {norm:.4g} exceeds the bound {bound:.4g}", norm)
    return Validation(True, norm=norm, samples=samples)


def check_file(path: Path) -> str:
    """A node returns a regular file; a symbolic link could make the aggregation read any file
    of the submit host, and a pipe or device could block it for ever. '' if it may be read."""
    if path.is_symlink():
        return f"{path} is a symbolic link (to {os.readlink(path)}), not a file a node returned"
    if path.exists() and not path.is_file():
        return f"{path} is not a regular file"
    return ""


def parse_count(text: str | None, most: int) -> int | None:
    """A metadata number 0 .. most, or None; compared digit by digit first, so a claim of any
    length costs nothing and never overflows."""
    if text is None or not _UINT.fullmatch(text):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(most)) or int(digits) > most:
        return None
    return int(digits)


def shown(text: str | None) -> str:
    """A metadata value for a message, cut short: a hostile one may be megabytes long."""
    if text is None or len(text) <= 40:
        return repr(text)
    return f"{text[:20]!r}... ({len(text)} characters)"


def _check_metadata(metadata: Mapping[str, str], expected: Mapping[str, int], most: int) -> str:
    fmt = metadata.get("format")
    if fmt != tensor_io.UPDATE_FORMAT:
        return f"metadata format is {shown(fmt)}, expected {tensor_io.UPDATE_FORMAT!r}"
    for key, want in expected.items():
        value = metadata.get(key)
        if value != str(want):
            return f"metadata {key} is {shown(value)}, expected {want}"
    samples = metadata.get("samples")
    if samples is None or not _UINT.fullmatch(samples) or not samples.strip("0"):
        return f"metadata samples is {shown(samples)}, expected a positive integer"
    if parse_count(samples, most) is None:
        digits = samples.lstrip("0")
        claim = digits if len(digits) <= 40 else f"a {len(digits)}-digit number of"
        return (
            f"metadata samples claims {claim} samples, more than the {most} the plan gives a "
            "node ([data] local_train)"
        )
    return ""


def _check_names(names: list[str], global_state: Mapping[str, torch.Tensor]) -> str:
    present = set(names)
    missing = [name for name in global_state if name not in present]
    if missing:
        return f"tensor {missing[0]!r} is missing ({len(missing)} missing in total)"
    extra = sorted(present - global_state.keys())
    if extra:
        return f"unexpected tensor {shown(extra[0])} ({len(extra)} not in the global model)"
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
