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

import torch

from aggregation.accepted import Accepted


def median_cut(n: int) -> int:
    """How many of n values the median cuts at each end: it keeps the middle one or two."""
    return (n - 1) // 2


def trimmed_cut(n: int, trim: float) -> int:
    """floor(trim x n), taken on the decimal the user wrote: in binary 0.29 x 100 is just
    below 29."""
    return math.floor(Fraction(repr(float(trim))) * n)


def reduce_stack(stacked: torch.Tensor, cut: int) -> torch.Tensor:
    """Mean of the values left after sorting each coordinate and cutting `cut` at each end."""
    n = stacked.shape[0]
    if cut < 0 or n - 2 * cut < 1:
        raise ValueError(f"cannot cut {cut} values at each end of {n}")
    ordered = stacked.sort(dim=0).values
    return ordered[cut : n - cut].mean(dim=0)


def coordinate_wise(
    reference: Mapping[str, torch.Tensor], updates: Sequence[Accepted], cut: int
) -> dict[str, torch.Tensor]:
    """Combine the updates tensor by tensor, cutting `cut` values at each end of every
    coordinate; floating tensors are reduced in float64, integer tensors (BatchNorm counters)
    take the lower median, so one node cannot inflate them."""
    with ExitStack() as stack:
        reads = [stack.enter_context(update.reading()) for update in updates]
        merged = {}
        for name, tensor in reference.items():
            stacked = torch.stack([read(name) for read in reads])
            if tensor.is_floating_point():
                merged[name] = reduce_stack(stacked, cut).to(tensor.dtype)
            else:
                merged[name] = stacked.sort(dim=0).values[(len(reads) - 1) // 2].clone()
    return merged
