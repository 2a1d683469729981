"""SGD with (Nesterov) momentum and weight decay: the optimizer every trainer of a run uses.

Not torch.optim.SGD, because building any torch.optim optimizer imports torch._dynamo (about
900 modules, 1.5 s of a fresh process on a quiet 2-core machine), which nothing else in a node
job uses: every fresh node job on a pool paid it before its first step. The arithmetic is
torch.optim.SGD's single-tensor path (its default on the CPU) operation for operation, so a
step gives the same bits (tests/test_sgd.py compares them).
"""

from collections.abc import Iterable

import torch


class Sgd:
    """One parameter group; `lr` may change between steps (the run's schedule sets it)."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        momentum: float,
        nesterov: bool,
        weight_decay: float,
    ) -> None:
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov and momentum > 0
        self.weight_decay = weight_decay
        # A parameter's buffer starts as its first gradient, as torch.optim.SGD's does.
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for index, param in enumerate(self.params):
            if param.grad is None:
                continue
            grad = param.grad
            if self.weight_decay != 0:
                grad = grad.add(param, alpha=self.weight_decay)
            if self.momentum != 0:
                buffer = self.buffers[index]
                if buffer is None:
                    buffer = self.buffers[index] = grad.detach().clone()
                else:
                    buffer.mul_(self.momentum).add_(grad, alpha=1)
                grad = grad.add(buffer, alpha=self.momentum) if self.nesterov else buffer
            param.add_(grad, alpha=-self.lr)

    def momentum_buffers(self) -> dict[int, torch.Tensor]:
        """The buffers made so far, by the parameter's index (what a checkpoint keeps)."""
        return {i: b for i, b in enumerate(self.buffers) if b is not None}

    def load_momentum_buffers(self, buffers: dict[int, torch.Tensor]) -> None:
        """Buffers a checkpoint kept, each already checked against its parameter's shape and
        dtype; the others start afresh."""
        self.buffers = [buffers.get(i) for i in range(len(self.params))]
