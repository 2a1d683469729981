"""BatchNorm running statistics and counters in the aggregation step: one policy for both modes.

Statistics are not gradients: the server optimizer never steps them (no lr, momentum or Adam).
A node's own statistics are what it measured on its data, so the next model's statistics are
the combination (by the round's rule and weights) of the nodes' own statistics, as they are.

An update carries its statistics as a delta from the model its job started from. An
asynchronous job may have started from an older version than the one its update is applied to,
and subtracting that delta from the newest model can drive a running variance below zero (the
model then predicts one class). So each update's statistics delta is first re-based onto the
current model (`rebase`): delta + (current - base) = current - the node's own statistics. With
the mean, the next statistics are then (1 - W) x current + sum of w_i x node i's statistics,
w_i = scale_i x samples_i / total samples, W = sum of w_i <= 1 (scale: staleness weight times
clipping factor): every variance stays a convex combination of variances. In a synchronous
round every update starts from the current model, nothing is shifted, and this is the plain
combination of the nodes' statistics.

Integer tensors (BatchNorm's num_batches_tracked) are counters: they take the combined value.
"""

from collections.abc import Mapping

import torch

from aggregation.buffers import is_mean, is_variance


def rebase(
    current: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """What to add (in float64) to an update's statistics deltas so they are relative to the
    current model: current - base for each running mean and variance of `base` (the version
    its job started from); nothing when it started from the current model."""
    if base is None:
        return {}
    return {
        name: current[name].double() - tensor.double()
        for name, tensor in base.items()
        if is_mean(name) or is_variance(name)
    }


def next_buffer(value: torch.Tensor, combined: torch.Tensor) -> torch.Tensor:
    """A non-parameter tensor of the next model, from its combined (re-based) delta."""
    return value - combined if value.is_floating_point() else combined.clone()
