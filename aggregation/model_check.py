"""The next global model, checked after the server step and before anything is saved.

Every update is validated on its own, but a server step can still break the model that comes
out of them (a server lr above 1 or Adam can carry finite weights past float32's range), and a
broken version would be handed to every later job and never recover. The aggregation step
(aggregation.aggregator) calls check_next_model for both modes, so a step that would break the
model is refused the same way in both, before any file is written.
"""

from collections.abc import Mapping

import torch

from aggregation.buffers import is_counter, is_variance
from node_payload.common.errors import UserError


class BrokenModel(UserError):
    """The server step would make the global model unusable; nothing was saved. Fatal: rerunning
    the step on the same updates would break it again."""


def check_next_model(
    state: Mapping[str, torch.Tensor], version: int, steps: int, merged: str
) -> None:
    """Raise BrokenModel, naming the tensor and what was merged (merged: "round 3's updates from
    nodes 0, 2", say), unless every floating tensor is finite, every
    running variance positive and every counter within 0 .. version x steps.

    Counters start at 0 in the untrained network the planner writes, and every version takes
    at most the planned local steps of a job on top of a version before it, so version v's
    counters are at most v x steps in either mode.
    """
    problem = _problem(state, version * steps)
    if problem:
        raise BrokenModel(
            f"the server step on {merged} would break the global model: {problem}; version "
            f"{version} is not saved"
        )


def _problem(state: Mapping[str, torch.Tensor], most_steps: int) -> str:
    for name, tensor in state.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                return f"tensor {name!r} would hold {bad} NaN or Inf values"
            if is_variance(name) and bool((tensor <= 0).any()):
                return (
                    f"tensor {name!r} would hold {int((tensor <= 0).sum())} running variances "
                    f"<= 0 (the smallest {tensor.min():.4g})"
                )
        elif is_counter(name):
            values = tensor.flatten().tolist()
            if values and not 0 <= min(values) <= max(values) <= most_steps:
                return (
                    f"counter {name!r} would be {min(values) if min(values) < 0 else max(values)}, "
                    f"expected 0 to {most_steps}"
                )
    return ""
