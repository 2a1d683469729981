"""Deep Gradient Compression (Lin et al., 2018) of a node job's update, lane by lane.

A node job's update (global minus local weights) is a pseudo-gradient. Of each float32
parameter tensor only the largest few values are sent; the rest is not lost but kept in an
error-feedback residual and added to the next job's update of the same lane. A lane is a
sequence of jobs that share the residual: node N in synchronous mode, lane N in asynchronous mode.
The residual stays on the execute machine that made it (node_payload.residual_cache): a lane's
job that lands elsewhere starts from zero.

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
5. warm-up: the sparsity of a lane's first `warmup` steps rises exponentially from 75% towards
   the target (with warmup 4 and a target of 99.9%: 75%, 93.7%, 98.4%, 99.6%, then 99.9%). It
   follows the lane's step (round), not its residual, so a job that starts from zero after a
   cache miss does not send a warm-up's bytes again.

Sent dense: tensors that are not parameters (BatchNorm running statistics must be averaged
whole, integer counters are not gradients) and parameters that are not float32. The float32
ones among them (the statistics) travel in float16 and are not error-fed: the file loses what
half precision rounds off them (a relative 2^-11; see node_payload.common.sparse_update). Small
parameter tensors (biases, BatchNorm weights) are compressed like the others: sending them dense
would cost a small CNN as many bytes as all its sparse values at 99.9%.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from node_payload.common import sparse_update
from node_payload.common.run_config import CompressionTable
from node_payload.residual_cache import Residual
from node_payload.update_methods import (
    METHODS,
    Encoded,
    clip_scale,
    error_fed_names,
    update_norm,
)

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


def compress(
    update: Mapping[str, torch.Tensor],
    params: set[str],
    residual: Residual,
    settings: DgcSettings,
    step: int,
) -> Compressed:
    """One job's step of the lane's state machine (the lane's job `step`, from 0); the input
    tensors are left untouched."""
    names = error_fed_names(update, params)
    norm = update_norm(update, names)
    scale = clip_scale(update, names, settings.clip_norm)
    sparsity = sparsity_at(step, settings.sparsity, settings.warmup)
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


@METHODS.register("dgc")
def dgc(
    update: Mapping[str, torch.Tensor],
    params: set[str],
    residual: Residual,
    table: CompressionTable,
    step: int,
) -> Encoded:
    """Deep Gradient Compression: a sparse update file (node_payload.common.sparse_update)."""
    result = compress(update, params, residual, DgcSettings.from_config(table), step)
    tensors, metadata = sparse_update.encode(result.dense, result.sparse)
    metrics = {
        "kept_fraction": result.kept_fraction,
        "sparsity": result.sparsity,
        "update_norm_before_clip": result.norm,
    }
    return Encoded(tensors, metadata, result.residual, metrics)
