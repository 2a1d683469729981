"""Coordinate-wise median and trimmed mean: rules one bad volunteer cannot drag far.

A weighted mean follows any single update that is large enough; the median and the trimmed mean
of each coordinate ignore the extremes, so up to floor(trim x N) bad updates per coordinate
(median: just under half) move the result only within the range of the good ones. Both are
unweighted on purpose: a node's claimed sample count is as untrusted as its tensors.

They need every accepted update at once, but only one tensor at a time: all update files are
opened lazily (memory-mapped, nothing read), then for each tensor name the N copies are read,
stacked and reduced before the next name (a sparse update is densified for that tensor only).
Memory is O(N x largest tensor), not O(N x model).
"""

import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from fractions import Fraction
from pathlib import Path

import torch

from node_payload.common import sparse_update

RULES = ("mean", "median", "trimmed_mean")


def trimmed_count(n: int, rule: str, trim: float) -> int:
    """How many values are cut at each end of n: the median keeps the middle one or two.

    floor(trim x n) is taken on the decimal the user wrote: in binary 0.29 x 100 is just below 29.
    """
    if rule == "median":
        return (n - 1) // 2
    return math.floor(Fraction(repr(float(trim))) * n)


def reduce_stack(stacked: torch.Tensor, cut: int) -> torch.Tensor:
    """Mean of the values left after sorting each coordinate and cutting `cut` at each end."""
    n = stacked.shape[0]
    if cut < 0 or n - 2 * cut < 1:
        raise ValueError(f"cannot cut {cut} values at each end of {n}")
    ordered = stacked.sort(dim=0).values
    return ordered[cut : n - cut].mean(dim=0)


def robust_merge(
    global_state: Mapping[str, torch.Tensor],
    accepted: Sequence[tuple[Path, float]],
    rule: str,
    trim: float,
) -> dict[str, torch.Tensor]:
    """Combine (path, scale) updates tensor by tensor; scale < 1 for updates that were clipped.

    Floating tensors are reduced in float64; integer tensors (BatchNorm counters) take the lower
    median, so one node cannot inflate them.
    """
    if rule not in RULES[1:]:
        raise ValueError(f"{rule!r} is not a coordinate-wise rule; use one of {RULES[1:]}")
    if not accepted:
        raise ValueError("no accepted updates to combine")
    cut = trimmed_count(len(accepted), rule, trim)
    with ExitStack() as stack:
        files = [stack.enter_context(sparse_update.open_update(path)) for path, _ in accepted]
        merged = {}
        for name, reference in global_state.items():
            if reference.is_floating_point():
                stacked = torch.stack(
                    [
                        _scaled(f.get(name), scale)
                        for f, (_, scale) in zip(files, accepted, strict=True)
                    ]
                )
                merged[name] = reduce_stack(stacked, cut).to(reference.dtype)
            else:
                ordered = torch.stack([f.get(name) for f in files]).sort(dim=0).values
                merged[name] = ordered[(len(files) - 1) // 2].clone()
    return merged


def _scaled(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    tensor = tensor.to(torch.float64)
    return tensor if scale == 1.0 else tensor * scale
