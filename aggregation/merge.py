"""A round's merge: validate every update, clip the large ones, combine the rest.

The default rule, the sample-weighted mean, reads updates one file and one tensor at a time, so
aggregating N nodes needs memory for the running sums only (O(model)), never for N models. The
robust rules (aggregation.robust) need O(N x largest tensor). A fixed node order makes the
result bit-identical between runs. Sparse updates are densified one tensor at a time as read.
"""

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aggregation.job_plan import JobPlan
from aggregation.robust import robust_merge
from aggregation.validate import validate_update
from node_payload.common import sparse_update


class WeightedMean:
    """Running sums in float64 for floating tensors; a running max for integer tensors.

    Integer tensors are counters (BatchNorm num_batches_tracked): averaging them is meaningless,
    the max keeps them monotonic across rounds.
    """

    def __init__(self, reference: Mapping[str, torch.Tensor]) -> None:
        self._dtypes = {name: tensor.dtype for name, tensor in reference.items()}
        self._sums = {
            name: torch.zeros(tensor.shape, dtype=torch.float64)
            for name, tensor in reference.items()
            if tensor.is_floating_point()
        }
        self._maxima: dict[str, torch.Tensor] = {}
        self.total_weight = 0

    def add(self, tensors: Iterable[tuple[str, torch.Tensor]], weight: int) -> None:
        """Consume (name, tensor) pairs lazily so only one tensor is materialised at a time."""
        for name, tensor in tensors:
            if name in self._sums:
                self._sums[name] += tensor.to(torch.float64) * weight
            elif name in self._maxima:
                self._maxima[name] = torch.maximum(self._maxima[name], tensor)
            else:
                self._maxima[name] = tensor.clone()
        self.total_weight += weight

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean (floating) and max (integer), in the reference dtypes and order."""
        if self.total_weight <= 0:
            raise ValueError("no weighted updates were added")
        return {
            name: (self._sums[name] / self.total_weight).to(dtype)
            if name in self._sums
            else self._maxima[name]
            for name, dtype in self._dtypes.items()
        }


@dataclass
class MergeResult:
    """mean_update has the layout of an update file: floating = mean(global - local), integer =
    max(local); it is empty when no update was accepted. clipped maps a node to the norm its
    update had before it was scaled down to clip_norm."""

    mean_update: dict[str, torch.Tensor]
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    clipped: dict[int, float] = field(default_factory=dict)
    norms: dict[int, float] = field(default_factory=dict)  # nodes whose norm was computed
    samples: int = 0


def merge_updates(
    global_state: Mapping[str, torch.Tensor],
    updates: Iterable[tuple[int, Path]],
    bound: float,
    round_: int,
    rule: str = "mean",
    trim: float = 0.2,
    clip_norm: float = 0.0,
    expected: Mapping[int, Mapping[str, int]] | None = None,
    scales: Mapping[int, float] | None = None,
    *,
    plan: JobPlan,
    bases: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
) -> MergeResult:
    """Validate each (node, path) in node order against the plan, clip accepted updates whose
    L2 norm exceeds clip_norm (0: never), and combine them by rule ("mean": weighted by sample
    count).

    An asynchronous buffer keys its updates by arrival, gives each one's metadata in expected
    (see validate_update), the buffers of the model it started from in bases and its staleness
    weight in scales: the mean is then sum(scale * samples * update) / sum(samples), so a stale
    update counts for less.
    """
    mean = WeightedMean(global_state)
    result = MergeResult(mean_update={})
    kept: list[tuple[Path, float]] = []
    for node, path in updates:
        check = validate_update(
            path,
            global_state,
            round_,
            node,
            bound,
            (expected or {}).get(node),
            plan=plan,
            base=(bases or {}).get(node),
        )
        if not math.isnan(check.norm):
            result.norms[node] = check.norm
        if not check.ok:
            result.rejected[node] = check.reason
            continue
        scale = (scales or {}).get(node, 1.0)
        if 0 < clip_norm < check.norm:
            scale *= clip_norm / check.norm
            result.clipped[node] = check.norm
        if rule == "mean":
            mean.add(_stream(path, global_state, scale), check.samples)
        else:
            kept.append((path, scale))
        result.accepted.append(node)
        result.samples += check.samples
    if result.accepted:
        result.mean_update = (
            mean.mean() if rule == "mean" else robust_merge(global_state, kept, rule, trim)
        )
    return result


def _stream(
    path: Path, global_state: Mapping[str, torch.Tensor], scale: float
) -> Iterator[tuple[str, torch.Tensor]]:
    with sparse_update.open_update(path) as update:
        for name in global_state:
            tensor = update.get(name)
            if scale != 1.0 and tensor.is_floating_point():
                tensor = tensor.to(torch.float64) * scale
            yield name, tensor
