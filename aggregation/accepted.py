"""An update that passed validation, as a combine rule reads it: one tensor at a time, in
float64, already weighted by its scale and re-based by the statistics policy, so that no rule
has to know about staleness, clipping or BatchNorm."""

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from node_payload.common import sparse_update
from node_payload.common.quantised_update import QuantisedReader

Read = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class Accepted:
    """samples: the count its metadata claims (validated against the plan); scale: its
    staleness weight times its clipping factor; shift: what aggregation.statistics.rebase adds
    to its statistics deltas."""

    path: Path
    samples: int
    scale: float = 1.0
    shift: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @contextmanager
    def reading(self) -> Iterator[Read]:
        """Open the file (lazily: nothing is read yet) and give a function from a tensor name
        to its tensor: floating ones in float64, shifted and scaled; integer ones as sent. A
        sparse or quantised update is densified one tensor at a time, as read."""
        with sparse_update.open_update(self.path) as update:
            yield lambda name: self._read(update, name)

    def _read(
        self, update: sparse_update.UpdateReader | QuantisedReader, name: str
    ) -> torch.Tensor:
        tensor = update.get(name)
        if not tensor.is_floating_point():
            return tensor
        tensor = tensor.to(torch.float64)
        if name in self.shift:
            tensor = tensor + self.shift[name]
        return tensor if self.scale == 1.0 else tensor * self.scale
