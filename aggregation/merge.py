"""A round's merge: validate every update, clip the large ones, combine the rest by rule.

Validation reads each update once, on its own (aggregation.validate); the combine rule
(aggregation.combine) then reads the accepted ones again, one tensor at a time, so the mean
needs memory for its running sums only (O(model)) and the robust rules O(N x largest tensor).
"""

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aggregation.accepted import Accepted
from aggregation.combine import COMBINE_RULES
from aggregation.job_plan import JobPlan
from aggregation.statistics import rebase
from aggregation.validate import validate_update


@dataclass
class MergeResult:
    """mean_update has the layout of an update file: floating = the combined global - local,
    integer = the combined local counters; it is empty when no update was accepted. clipped
    maps a node to the norm its update had before it was scaled down to clip_norm."""

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
    L2 norm exceeds clip_norm (0: never), and combine them by the registered rule ("mean":
    weighted by sample count).

    An asynchronous buffer keys its updates by arrival, gives each one's metadata in expected
    (see validate_update), the non-parameter tensors of the model it started from in bases
    (its statistics are checked against them and re-based, aggregation.statistics) and its
    staleness weight in scales: the mean is then sum(scale * samples * update) / sum(samples),
    so a stale update counts for less.
    """
    combine = COMBINE_RULES[rule]
    result = MergeResult(mean_update={})
    accepted: list[Accepted] = []
    for node, path in updates:
        base = (bases or {}).get(node)
        check = validate_update(
            path,
            global_state,
            round_,
            node,
            bound,
            (expected or {}).get(node),
            plan=plan,
            base=base,
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
        accepted.append(Accepted(path, check.samples, scale, rebase(global_state, base)))
        result.accepted.append(node)
        result.samples += check.samples
    if accepted:
        result.mean_update = combine(global_state, accepted, trim)
    return result
