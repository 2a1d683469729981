"""BatchNorm statistics and counters of one update, checked against the model its job started from.

An update carries global - local for running statistics as for weights, but the server step
applies them without a learning rate: a node's own statistics enter the global model as they
are, so they are checked as statistics, not only as numbers.

- A node's running variance must be positive and within a factor VAR_FACTOR of the one it
  started from. Honest first rounds, whose running variances start at 1 whatever the
  activations are, moved smallcnn by up to 44x and resnet18 by up to 218x (374x with inputs in
  [0, 1]); later rounds by at most 33x. Merging is a convex combination, so a node with a share
  w of a round can then scale a variance by at most 1 + 999 w, never drive it to zero or
  below; and float16 transport (DGC) of a delta loses at most 1000 x 2^-11 < 1/2 of the
  smallest variance allowed, so it cannot flip its sign.
- A node's running mean must be finite and move by at most MEAN_SHIFT_STDS standard deviations
  (the larger of the two variances'): honest rounds moved means by at most 4.
- Counters (num_batches_tracked) advance by one per local step: from 0 to the starting model's
  value plus the planned steps. Other integer tensors (attention position indices) are
  constants of the network and must come back unchanged.
"""

from collections.abc import Callable, Mapping

import torch

VAR_FACTOR = 1000.0
MEAN_SHIFT_STDS = 100.0


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def is_variance(name: str) -> bool:
    return _leaf(name) == "running_var"


def is_mean(name: str) -> bool:
    return _leaf(name) == "running_mean"


def is_counter(name: str) -> bool:
    return _leaf(name) == "num_batches_tracked"


def check_statistics(node: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> str:
    """node: the node's own running statistics (base - delta, float64) by name; '' if sound."""
    for name, value in node.items():
        if not torch.isfinite(value).all():
            return f"tensor {name!r}: the node's statistics would hold NaN or Inf"
        old = base[name].double()
        problem = ""
        if is_variance(name):
            problem = _variance_problem(name, value.flatten(), old.flatten())
        elif is_mean(name) and (variance := name[: -len("mean")] + "var") in node:
            spread = torch.maximum(base[variance].double(), node[variance]).sqrt()
            problem = _mean_problem(name, ((value - old).abs() / spread).flatten())
        if problem:
            return problem
    return ""


def _variance_problem(name: str, value: torch.Tensor, old: torch.Tensor) -> str:
    """A running variance (flattened) that is not positive, or moved by more than VAR_FACTOR."""
    low = int(value.argmin())
    if value[low] <= 0:
        return (
            f"tensor {name!r}: the node's running variance would be {value[low]:.4g} at index "
            f"{low}, not positive"
        )
    return _beyond(
        torch.maximum(value / old, old / value),
        VAR_FACTOR,
        lambda i: (
            f"tensor {name!r}: the running variance at index {i} changes from "
            f"{old[i]:.4g} to {value[i]:.4g}, by more than the factor {VAR_FACTOR:g} allowed in "
            "one update"
        ),
    )


def _mean_problem(name: str, shift: torch.Tensor) -> str:
    """A running mean that moved by more than MEAN_SHIFT_STDS (shift: in standard deviations)."""
    return _beyond(
        shift,
        MEAN_SHIFT_STDS,
        lambda i: (
            f"tensor {name!r}: the running mean at index {i} moves by {shift[i]:.4g} "
            f"standard deviations, more than the {MEAN_SHIFT_STDS:g} allowed in one update"
        ),
    )


def _beyond(measure: torch.Tensor, limit: float, message: Callable[[int], str]) -> str:
    """message(index) for the coordinate where measure is largest, if that exceeds limit."""
    worst = int(measure.argmax())
    return message(worst) if measure[worst] > limit else ""


def check_integer(name: str, tensor: torch.Tensor, base: torch.Tensor, steps: int) -> str:
    """A counter within 0 .. base + steps (Python integers: no int64 overflow), or a constant
    equal to base; '' if sound."""
    if not is_counter(name):
        if torch.equal(tensor, base):
            return ""
        return f"tensor {name!r} differs from the model's; it is a constant of the network"
    for got, had in zip(tensor.flatten().tolist(), base.flatten().tolist(), strict=True):
        if not 0 <= got <= had + steps:
            return (
                f"counter {name!r} is {got}, expected 0 to {had + steps} (the model's {had} "
                f"plus the {steps} local steps of the plan)"
            )
    return ""
