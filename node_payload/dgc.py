"""Deep Gradient Compression (Lin et al., 2018) of a node job's update, lane by lane.

A node job's update (global minus local weights) is a pseudo-gradient. Of each float32
parameter tensor only the largest few values are sent; the rest is not lost but kept in an
error-feedback residual and added to the next job's update of the same lane. A lane is a
sequence of jobs that share the residual: node N in synchronous mode, lane N in asynchronous mode.
Its next job may run on another machine, so the residual travels as a file, residual.safetensors:
the job reads it from its working directory and writes the new one beside its update; the
submit host keeps the newest one per lane and hands it to the lane's next job.

Per job, with u and v the lane's momentum and velocity (zero at the start):

1. local clipping: the update's parameter tensors are scaled so that their joint L2 norm is at
   most clip_norm (0: off);
2. momentum correction: u <- momentum * u + update, v <- v + u (sparsify the velocity, so that
   momentum keeps acting on what is not sent yet);
3. top-k per tensor: k = ceil(numel x (1 - sparsity)), at least 1, of |v|. Per tensor rather
   than over the model so that every layer moves each job; one global top-k would send mostly
   the layers with the largest updates and starve the rest;
4. momentum factor masking: u is zeroed where values were sent, and v keeps only what the
   float16 rounding of the sent values lost (zero for exactly representable values);
5. warm-up: the sparsity of a lane's first `warmup` jobs rises exponentially from 75% towards
   the target (with warmup 4 and a target of 99.9%: 75%, 93.7%, 98.4%, 99.6%, then 99.9%).

Sent dense: tensors that are not parameters (BatchNorm running statistics must be averaged
whole, integer counters are not gradients) and parameters that are not float32. The float32
ones among them (the statistics) travel in float16 and are not error-fed: the file loses what
half precision rounds off them (a relative 2^-11; see node_payload.common.sparse_update). Small
parameter tensors (biases, BatchNorm weights) are compressed like the others: sending them dense
would cost a small CNN as many bytes as all its sparse values at 99.9%.

A residual that is absent, or has no tensors (write_empty_residual: what the planner may put in
place before a lane's first job, since a pool needs every listed input file to exist), starts
the lane from zeros. One that is unreadable, from another run or lane, of another model, holding
NaN/Inf, or written by this job's round or a later one, is named in one warning line and
replaced by zeros: the job goes on, and only unsent residual is lost, never an applied update.
"""

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from node_payload.common import sparse_update, tensor_io
from node_payload.common.run_config import CompressionTable
from node_payload.common.run_layout import RESIDUAL_FILE

START_SPARSITY = 0.75


@dataclass(frozen=True)
class DgcSettings:
    """The [compression] table's DGC keys."""

    sparsity: float = 0.999
    warmup: int = 4
    momentum: float = 0.0
    clip_norm: float = 0.0

    @classmethod
    def from_config(cls, table: CompressionTable) -> "DgcSettings":
        return cls(table.sparsity, table.warmup, table.momentum, table.clip_norm)


@dataclass
class Residual:
    """A lane's state: per compressed tensor its momentum u (only with momentum) and velocity v;
    jobs counts the lane's jobs folded in so far. Missing tensors are zeros."""

    u: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    jobs: int = 0


@dataclass
class Compressed:
    """One job's output: what goes in the update file, and the lane's state after it."""

    dense: dict[str, torch.Tensor]
    sparse: dict[str, sparse_update.SparseTensor]
    residual: Residual
    sparsity: float
    norm: float  # L2 norm of the update's compressed tensors, before clipping

    @property
    def kept_fraction(self) -> float:
        sent = sum(len(part.values) for part in self.sparse.values())
        total = sum(math.prod(part.shape) for part in self.sparse.values())
        return sent / total if total else 1.0


def sparsity_at(jobs_done: int, target: float, warmup: int) -> float:
    """The sparsity of a lane's job after jobs_done others: the kept density falls
    geometrically from 25% to 1 - target over the first `warmup` jobs."""
    if jobs_done >= warmup or target <= START_SPARSITY:
        return target
    start, end = 1 - START_SPARSITY, 1 - target
    return 1 - start * (end / start) ** (jobs_done / warmup)


def kept_count(numel: int, sparsity: float) -> int:
    """Values of a tensor that are sent: ceil(numel x (1 - sparsity)), between 1 and numel.

    Rounded to 9 digits first, so that 10000 x (1 - 0.99) is 100 and not 101.
    """
    return min(numel, max(1, math.ceil(round(numel * (1 - sparsity), 9))))


def compressed_names(update: Mapping[str, torch.Tensor], params: set[str]) -> list[str]:
    """The tensors sent sparse: float32 parameters; everything else goes dense."""
    return [n for n, t in update.items() if n in params and t.dtype == torch.float32]


def compress(
    update: Mapping[str, torch.Tensor],
    params: set[str],
    residual: Residual,
    settings: DgcSettings,
) -> Compressed:
    """One job's step of the lane's state machine; the input tensors are left untouched."""
    names = compressed_names(update, params)
    squares = sum(
        torch.linalg.vector_norm(update[n], dtype=torch.float64).item() ** 2 for n in names
    )
    norm = math.sqrt(squares)
    scale = settings.clip_norm / norm if 0 < settings.clip_norm < norm else 1.0
    sparsity = sparsity_at(residual.jobs, settings.sparsity, settings.warmup)
    after = Residual(jobs=residual.jobs + 1)
    sparse = {}
    for name in names:
        u = update[name].flatten() * scale
        if settings.momentum and name in residual.u:
            u += settings.momentum * residual.u[name].flatten()
        v = residual.v[name].flatten() + u if name in residual.v else u.clone()
        positions = torch.topk(v.abs(), kept_count(v.numel(), sparsity), sorted=False)
        positions = positions.indices.sort().values
        sent = v[positions].clamp(-sparse_update.MAX_HALF, sparse_update.MAX_HALF).half()
        v[positions] -= sent.float()
        u[positions] = 0.0
        shape = tuple(update[name].shape)
        sparse[name] = sparse_update.SparseTensor(shape, positions, sent)
        after.v[name] = v.reshape(shape)
        if settings.momentum:
            after.u[name] = u.reshape(shape)
    dense = {n: t for n, t in update.items() if n not in sparse}
    return Compressed(dense, sparse, after, sparsity, norm)


def _warn(path: Path, why: str) -> None:
    print(f"warning: {path}: {why}; the lane goes on from a zero residual", file=sys.stderr)


def load_residual(
    path: Path,
    run_id: str,
    lane: int,
    round_: int,
    reference: Mapping[str, torch.Tensor],
    momentum: float,
) -> tuple[Residual, str]:
    """The lane's residual and how it was found ("none", "loaded" or "ignored: why").

    reference maps the compressed tensor names to tensors of their shapes.
    """
    if not path.exists():
        return Residual(), "none"
    try:
        tensors, meta = tensor_io.load_tensors(path)
        why = _residual_problem(tensors, meta, run_id, lane, round_, reference, momentum)
    except (tensor_io.BadTensorFile, OSError) as exc:
        why = f"unreadable ({exc})"
    if why:
        _warn(path, why)
        return Residual(), f"ignored: {why}"
    residual = Residual(jobs=int(meta["jobs"]))
    for key, tensor in tensors.items():
        name, part = key.rsplit("::", 1)
        (residual.u if part == "u" else residual.v)[name] = tensor
    return residual, "loaded"


def _residual_problem(
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, str],
    run_id: str,
    lane: int,
    round_: int,
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
    if not str(meta.get("jobs")).isdigit() or not str(meta.get("round")).lstrip("-").isdigit():
        return f"metadata jobs {meta.get('jobs')!r} or round {meta.get('round')!r} is not a number"
    if int(meta["round"]) >= round_:
        return (
            f"it was written by round {meta['round']}, not before this job's round {round_} "
            "(an earlier attempt's output?)"
        )
    if not tensors:
        return ""
    parts = ("u", "v") if momentum else ("v",)
    expected = {f"{name}::{part}": ref for name, ref in reference.items() for part in parts}
    if tensors.keys() != expected.keys():
        return "its tensors are not those of this model and momentum setting"
    for key, tensor in tensors.items():
        if tensor.dtype != torch.float32 or tensor.shape != expected[key].shape:
            want = tuple(expected[key].shape)
            return f"tensor {key!r} is {tensor.dtype} {tuple(tensor.shape)}, not float32 {want}"
        if not torch.isfinite(tensor).all():
            return f"tensor {key!r} contains NaN or Inf"
    return ""


def save_residual(path: Path, residual: Residual, run_id: str, lane: int, round_: int) -> None:
    tensors = {f"{n}::u": t for n, t in residual.u.items()}
    tensors |= {f"{n}::v": t for n, t in residual.v.items()}
    tensor_io.save_tensors(
        path, tensors, tensor_io.residual_metadata(run_id, lane, residual.jobs, round_)
    )


def write_empty_residual(path: Path, run_id: str, lane: int) -> None:
    """A lane's residual before its first job: no tensors (zeros), no jobs, no model needed."""
    save_residual(path, Residual(), run_id, lane, -1)


def compress_job(
    update: Mapping[str, torch.Tensor],
    params: set[str],
    config: Mapping[str, Any],
    metadata: Mapping[str, str],
    lane: int,
    round_: int,
    residual_in: Path,
    update_path: Path,
) -> dict[str, Any]:
    """The node's DGC step: read the lane's residual, write the sparse update at update_path and
    the new residual.safetensors beside it; returns the metrics to add to metrics.json."""
    settings = DgcSettings.from_config(config.compression)
    run_id = config.run.run_id
    reference = {n: update[n] for n in compressed_names(update, params)}
    residual, found = load_residual(residual_in, run_id, lane, round_, reference, settings.momentum)
    result = compress(update, params, residual, settings)
    sparse_update.save_sparse_update(update_path, result.dense, result.sparse, metadata)
    save_residual(update_path.parent / RESIDUAL_FILE, result.residual, run_id, lane, round_)
    return {
        "update_bytes": update_path.stat().st_size,
        "kept_fraction": result.kept_fraction,
        "sparsity": result.sparsity,
        "update_norm_before_clip": result.norm,
        "residual": found,
        "residual_jobs": result.residual.jobs,
    }
