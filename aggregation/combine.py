"""The combine rules: how a round's (or a buffer's) accepted updates become one update.

Each rule is one registered function (COMBINE_RULES, chosen by [server] rule) from the global
model's tensors (names, shapes, dtypes), the accepted updates (at least one, each read through
aggregation.accepted: weighted, clipped and re-based already) and [server] trim to the combined
update, in the layout of an update file and the reference's dtypes.
"""

from collections.abc import Callable, Mapping, Sequence

import torch

from aggregation.accepted import Accepted
from aggregation.robust import coordinate_wise, median_cut, trimmed_cut
from node_payload.common.registry import Registry

Tensors = Mapping[str, torch.Tensor]
CombineRule = Callable[[Tensors, Sequence[Accepted], float], dict[str, torch.Tensor]]
COMBINE_RULES: Registry[CombineRule] = Registry("combine_rules", "[server] rule")


@COMBINE_RULES.register("mean")
def mean(reference: Tensors, updates: Sequence[Accepted], trim: float) -> dict[str, torch.Tensor]:
    """Weighted by sample count, summed in float64; integer tensors (counters) take the max,
    which keeps them monotonic across rounds (averaging counters is meaningless).

    Streams one file and one tensor at a time, so N updates need memory for the running sums
    only (O(model)), never for N models; a fixed order makes the result bit-identical between
    runs.
    """
    sums = {
        name: torch.zeros(tensor.shape, dtype=torch.float64)
        for name, tensor in reference.items()
        if tensor.is_floating_point()
    }
    maxima: dict[str, torch.Tensor] = {}
    for update in updates:
        with update.reading() as read:
            for name in reference:
                if name in sums:
                    sums[name] += read(name) * update.samples
                elif name in maxima:
                    maxima[name] = torch.maximum(maxima[name], read(name))
                else:
                    maxima[name] = read(name).clone()
    total = sum(update.samples for update in updates)
    return {
        name: (sums[name] / total).to(tensor.dtype) if name in sums else maxima[name]
        for name, tensor in reference.items()
    }


@COMBINE_RULES.register("median")
def median(reference: Tensors, updates: Sequence[Accepted], trim: float) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (aggregation.robust): just under half the updates may be bad."""
    return coordinate_wise(reference, updates, median_cut(len(updates)))


@COMBINE_RULES.register("trimmed_mean")
def trimmed_mean(
    reference: Tensors, updates: Sequence[Accepted], trim: float
) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean of what is left after cutting floor(trim x N) at each end."""
    return coordinate_wise(reference, updates, trimmed_cut(len(updates), trim))
