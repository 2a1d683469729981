"""A lane's error-feedback residual, kept on the execute machine that made it.

A compressed update (DGC, fp16, int8) leaves behind what it did not send: a residual as large
as the model, added to the lane's next update. It never crosses the network: the job writes it
into the machine's cache, `[data] node_cache`/residuals, or, when that is empty,
/var/tmp/dagtrain-UID/residuals (never $TMPDIR: HTCondor points it at the job's scratch folder,
deleted with the job). A file there is named by its run (a hash of run_id), lane and step
(the round, or an asynchronous lane's job step): RUN/lLLL_jSSSS.safetensors.

The lane's next job finds it when it lands on the same machine: it takes the newest residual
of its run and lane written by an earlier step. A job on another machine, or after the cache
was cleared, starts from zero: the update it sends is still whole, only what earlier jobs held
back is lost (docs/benchmarks.md measures what that costs), and metrics.json says so
("residual": "none"), so the round can count the misses. A file that is unreadable, of another
run, lane, step or model, or holds NaN/Inf is named in one warning line and never used.
"""

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from node_payload.common import tensor_io
from node_payload.common.run_layout import job_tag, lane_tag
from node_payload.machine_cache import run_folder

RESIDUALS = "residuals"
_NAME = re.compile(r"l(\d{3,})_j(\d{4,})\.safetensors")


@dataclass
class Residual:
    """A lane's state: per compressed tensor its momentum u (DGC with momentum only) and the
    values still to send, v; jobs counts the lane's jobs folded in. Missing tensors are zeros."""

    u: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    jobs: int = 0


@dataclass(frozen=True)
class Found:
    """What a job started from: the residual, how it was found ("none", "loaded" or "ignored:
    why"), the step that wrote it (-1: none) and the bytes read from the machine's cache."""

    residual: Residual
    how: str
    step: int = -1
    bytes: int = 0


def run_cache(node_cache: str, run_id: str) -> Path | None:
    """This run's residual folder on this machine (node_payload/machine_cache.py); None (after
    one warning line) when the machine gives none: the lane then starts from zero every job."""
    return run_folder(node_cache, RESIDUALS, run_id, "no residual is kept")


def _lane_files(folder: Path, lane: int) -> dict[int, Path]:
    """step -> file of this lane's residuals in the folder."""
    found = {}
    for path in folder.glob(f"{lane_tag(lane)}_j*.safetensors"):
        match = _NAME.fullmatch(path.name)
        if match and int(match[1]) == lane:
            found[int(match[2])] = path
    return found


def load(
    folder: Path | None,
    run_id: str,
    lane: int,
    step: int,
    reference: Mapping[str, torch.Tensor],
    momentum: float,
) -> Found:
    """The newest residual of this run and lane from a step before `step`, checked; reference
    maps the error-fed tensor names to tensors of their shapes."""
    earlier = {s: p for s, p in _lane_files(folder, lane).items() if s < step} if folder else {}
    if not earlier:
        return Found(Residual(), "none")
    written_by = max(earlier)
    path = earlier[written_by]
    try:
        tensors, meta = tensor_io.load_tensors(path)
        why = _problem(tensors, meta, run_id, lane, written_by, reference, momentum)
    except (tensor_io.BadTensorFile, OSError) as exc:
        why = f"unreadable ({exc})"
    if why:
        print(f"warning: {path}: {why}; the lane goes on from a zero residual", file=sys.stderr)
        return Found(Residual(), f"ignored: {why}")
    residual = Residual(jobs=int(meta["jobs"]))
    for key, tensor in tensors.items():
        name, part = key.rsplit("::", 1)
        (residual.u if part == "u" else residual.v)[name] = tensor
    return Found(residual, "loaded", written_by, path.stat().st_size)


def _problem(
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, str],
    run_id: str,
    lane: int,
    step: int,
    reference: Mapping[str, torch.Tensor],
    momentum: float,
) -> str:
    """Why the residual cannot be used, or ""."""
    if meta.get("format") != tensor_io.RESIDUAL_FORMAT:
        return f"format is {meta.get('format')!r}, not {tensor_io.RESIDUAL_FORMAT!r}"
    if meta.get("run_id") != run_id:
        return f"it belongs to run {meta.get('run_id')!r}, this is run {run_id!r}"
    if meta.get("lane") != str(lane):
        return f"it belongs to lane {meta.get('lane')!r}, this is lane {lane}"
    if not str(meta.get("jobs")).isdigit():
        return f"metadata jobs {meta.get('jobs')!r} is not a number"
    if meta.get("round") != str(step):
        return f"it says step {meta.get('round')!r}, its name says step {step}"
    parts = ("u", "v") if momentum else ("v",)
    expected = {f"{name}::{part}": ref for name, ref in reference.items() for part in parts}
    if tensors.keys() != expected.keys():
        return "its tensors are not those of this model and compression settings"
    for key, tensor in tensors.items():
        if tensor.dtype != torch.float32 or tensor.shape != expected[key].shape:
            want = tuple(expected[key].shape)
            return f"tensor {key!r} is {tensor.dtype} {tuple(tensor.shape)}, not float32 {want}"
        if not torch.isfinite(tensor).all():
            return f"tensor {key!r} contains NaN or Inf"
    return ""


def save(folder: Path | None, residual: Residual, run_id: str, lane: int, step: int) -> int:
    """Keep the residual after `step` on this machine and return its bytes (0 without a
    cache). The newest one before it stays, for a retry of this step; older ones go."""
    if folder is None:
        return 0
    path = folder / f"{lane_tag(lane)}_{job_tag(step)}.safetensors"
    tensors = {f"{n}::u": t for n, t in residual.u.items()}
    tensors |= {f"{n}::v": t for n, t in residual.v.items()}
    metadata = tensor_io.residual_metadata(run_id, lane, residual.jobs, step)
    tensor_io.save_tensors(path, tensors, metadata)
    earlier = {s: p for s, p in _lane_files(folder, lane).items() if s < step}
    for older, stale in earlier.items():
        if older < max(earlier):
            stale.unlink(missing_ok=True)
    return path.stat().st_size
