"""The server step: treats the combined update (global - mean local) as a pseudo-gradient.

Each optimizer is one registered function (SERVER_OPTIMIZERS, chosen by [server] optimizer)
that turns a parameter's combined delta into the step direction, keeping its own buffers in
the ServerOptimizer. With lr=1 and no momentum SGD is plain federated averaging; momentum or
Nesterov momentum is DiLoCo's outer step; Adam is FedAdam (Reddi et al., "Adaptive Federated
Optimization") with Adam's bias correction. The lr rises linearly over the first `warmup` steps
(a momentum buffer or Adam's moments are noisy then, and a short run has few steps to recover)
and, with `decay_steps`, falls as a cosine to 0 over that many steps (an asynchronous run's
mixing weight: a late, stale update then moves the model little). The optimizer's state is saved
beside each global model so a resumed DAG continues exactly.
"""

import math
from collections.abc import Callable, Mapping

import torch

from aggregation.statistics import next_buffer
from node_payload.common.errors import UserError
from node_payload.common.registry import Registry
from node_payload.common.run_config import ServerTable

SERVER_FORMAT = "dagtrain-server/1"

# (optimizer, parameter name, its combined delta) -> the direction the lr scales
Direction = Callable[["ServerOptimizer", str, torch.Tensor], torch.Tensor]
SERVER_OPTIMIZERS: Registry[Direction] = Registry("server_optimizers", "[server] optimizer")


@SERVER_OPTIMIZERS.register("sgd")
def sgd(optimizer: "ServerOptimizer", name: str, delta: torch.Tensor) -> torch.Tensor:
    """The delta itself, or with (Nesterov) momentum: a velocity buffer per parameter."""
    if optimizer.momentum == 0:
        return delta
    previous = optimizer.buffers.get(name)
    buffer = delta.clone() if previous is None else previous * optimizer.momentum + delta
    optimizer.buffers[name] = buffer
    return delta + buffer * optimizer.momentum if optimizer.nesterov else buffer


@SERVER_OPTIMIZERS.register("adam")
def adam(optimizer: "ServerOptimizer", name: str, delta: torch.Tensor) -> torch.Tensor:
    """FedAdam with bias-corrected moments; eps (tau) bounds the adaptivity.

    Each step is about lr per coordinate in the direction of the recent deltas, whatever their
    size, so FedAdam wants a server lr far below 1 (the paper tunes it in 1e-3 .. 1).
    """
    buffers = optimizer.buffers
    m = buffers.get(f"m.{name}", torch.zeros_like(delta))
    v = buffers.get(f"v.{name}", torch.zeros_like(delta))
    m = m * optimizer.beta1 + delta * (1 - optimizer.beta1)
    v = v * optimizer.beta2 + delta * delta * (1 - optimizer.beta2)
    buffers[f"m.{name}"] = m
    buffers[f"v.{name}"] = v
    t = optimizer.steps + 1
    m_hat = m / (1 - optimizer.beta1**t)
    v_hat = v / (1 - optimizer.beta2**t)
    return m_hat / (v_hat.sqrt() + optimizer.eps)


class ServerOptimizer:
    """A registered optimizer's hyperparameters and buffers, stepping trainable parameters only;
    the model's other tensors follow the statistics policy (aggregation.statistics)."""

    def __init__(
        self,
        kind: str,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        beta1: float = 0.9,
        beta2: float = 0.99,
        eps: float = 1e-3,
        warmup: int = 0,
        decay_steps: int = 0,
    ) -> None:
        self._direction = SERVER_OPTIMIZERS[kind]
        if not lr > 0:
            raise UserError(f"server learning rate {lr} must be positive (1.0 = plain averaging)")
        if not 0 <= momentum < 1:
            raise UserError(f"server momentum {momentum} must be in [0, 1)")
        if nesterov and momentum == 0:
            raise UserError("server Nesterov momentum needs momentum > 0")
        if kind == "adam" and (momentum or nesterov):
            raise UserError("server momentum and nesterov apply to 'sgd'; Adam's momentum is beta1")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise UserError(f"server beta1 {beta1} and beta2 {beta2} must be in [0, 1)")
        if not eps > 0:
            raise UserError(f"server eps {eps} must be positive")
        if warmup < 0 or decay_steps < 0:
            raise UserError(f"server warmup {warmup} and decay_steps {decay_steps} must be >= 0")
        self.kind = kind
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.warmup = warmup
        self.decay_steps = decay_steps
        self.steps = 0
        self.buffers: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, server: ServerTable, decay_steps: int = 0) -> "ServerOptimizer":
        """Build from the run config's [server] table."""
        return cls(
            server.optimizer,
            server.lr,
            server.momentum,
            server.nesterov,
            server.beta1,
            server.beta2,
            server.eps,
            server.warmup,
            decay_steps,
        )

    def current_lr(self) -> float:
        """The lr of the next step: warm-up, then constant or the cosine decay."""
        step = self.steps
        lr = self.lr * min(1.0, (step + 1) / self.warmup) if self.warmup else self.lr
        if self.decay_steps:
            lr *= 0.5 * (1 + math.cos(math.pi * min(step / self.decay_steps, 1.0)))
        return lr

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
        lr = self.current_lr()
        for name, value in global_state.items():
            delta = mean_update[name]
            if name in param_names and value.is_floating_point():
                new_state[name] = value - self._direction(self, name, delta) * lr
            else:
                new_state[name] = next_buffer(value, delta)
        self.steps += 1
        return new_state

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Buffers (momentum: by parameter name; Adam: 'm.NAME', 'v.NAME') and metadata."""
        metadata = {
            "format": SERVER_FORMAT,
            "kind": self.kind,
            "lr": repr(self.lr),
            "momentum": repr(self.momentum),
            "nesterov": str(self.nesterov).lower(),
            "beta1": repr(self.beta1),
            "beta2": repr(self.beta2),
            "eps": repr(self.eps),
            "steps": str(self.steps),
        }
        return dict(self.buffers), metadata

    def load_state_dict(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Restore buffers saved by state_dict; the hyperparameters come from the config."""
        if metadata.get("format") != SERVER_FORMAT or metadata.get("kind") != self.kind:
            raise ValueError(
                f"not a {self.kind!r} server state (format {metadata.get('format')!r}, "
                f"kind {metadata.get('kind')!r})"
            )
        self.steps = int(metadata["steps"])
        self.buffers = {name: tensor.clone() for name, tensor in tensors.items()}
