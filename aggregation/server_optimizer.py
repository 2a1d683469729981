"""The server step: treats the averaged update (global - mean local) as a pseudo-gradient.

With lr=1 and no momentum this is plain federated averaging; momentum smooths the direction
across rounds. Its buffers are saved beside each global model so a resumed DAG continues exactly.
"""

from collections.abc import Mapping
from typing import Literal

import torch

from node_payload.errors import UserError

SERVER_FORMAT = "dagtrain-server/1"


class ServerOptimizer:
    """SGD with optional (Nesterov) momentum on trainable parameters only.

    BatchNorm running statistics are not gradients: floating buffers are always plainly averaged
    and integer buffers take the merged value.
    """

    def __init__(
        self, kind: Literal["sgd"], lr: float, momentum: float = 0.0, nesterov: bool = False
    ) -> None:
        if kind != "sgd":
            raise UserError(f"server optimizer {kind!r} is not supported; use 'sgd'")
        if not lr > 0:
            raise UserError(f"server learning rate {lr} must be positive (1.0 = plain averaging)")
        if not 0 <= momentum < 1:
            raise UserError(f"server momentum {momentum} must be in [0, 1)")
        if nesterov and momentum == 0:
            raise UserError("server Nesterov momentum needs momentum > 0")
        self.kind = kind
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.steps = 0
        self._buffers: dict[str, torch.Tensor] = {}

    def step(
        self,
        global_state: Mapping[str, torch.Tensor],
        mean_update: Mapping[str, torch.Tensor],
        param_names: set[str],
    ) -> dict[str, torch.Tensor]:
        """Return the next global state; mean_update has the layout of an update file."""
        if mean_update.keys() != global_state.keys():
            raise ValueError("the merged update and the global model have different tensors")
        unknown = param_names - global_state.keys()
        if unknown:
            raise ValueError(f"parameters not in the global model: {sorted(unknown)}")
        new_state = {}
        for name, value in global_state.items():
            delta = mean_update[name]
            if not value.is_floating_point():
                new_state[name] = delta.clone()
            elif name in param_names:
                new_state[name] = value - self._direction(name, delta) * self.lr
            else:
                new_state[name] = value - delta
        self.steps += 1
        return new_state

    def _direction(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        if self.momentum == 0:
            return delta
        previous = self._buffers.get(name)
        buffer = delta.clone() if previous is None else previous * self.momentum + delta
        self._buffers[name] = buffer
        return delta + buffer * self.momentum if self.nesterov else buffer

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Momentum buffers (keyed by parameter name) and metadata, for tensor_io.save_tensors."""
        metadata = {
            "format": SERVER_FORMAT,
            "kind": self.kind,
            "lr": repr(self.lr),
            "momentum": repr(self.momentum),
            "nesterov": str(self.nesterov).lower(),
            "steps": str(self.steps),
        }
        return dict(self._buffers), metadata

    def load_state_dict(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Restore buffers saved by state_dict; the hyperparameters come from the config."""
        if metadata.get("format") != SERVER_FORMAT or metadata.get("kind") != self.kind:
            raise ValueError(
                f"not a {self.kind!r} server state (format {metadata.get('format')!r}, "
                f"kind {metadata.get('kind')!r})"
            )
        self.steps = int(metadata["steps"])
        self._buffers = {name: tensor.clone() for name, tensor in tensors.items()}
