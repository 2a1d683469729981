"""Local training of the global model copy, and evaluation shared with the aggregator."""

import math
from dataclasses import dataclass

import torch
from torch import nn

from node_payload.batches import augment as augment_batch


@dataclass(frozen=True)
class LocalResult:
    loss: float
    accuracy: float
    steps: int


def round_lr(base_lr: float, schedule: str, round_: int, rounds: int) -> float:
    """Cosine decay across rounds: late rounds take small steps so averaged models agree."""
    if schedule == "constant" or rounds <= 1:
        return base_lr
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * round_ / rounds)))


def steps_for(local_steps: int, local_epochs: float, samples: int, batch_size: int) -> int:
    if local_steps:
        return local_steps
    return max(1, math.ceil(local_epochs * samples / batch_size))


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    augment: bool,
    seed: int,
) -> LocalResult:
    """SGD with momentum over shuffled epochs of the local set; seeded so a node is reproducible."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    order = torch.randperm(len(y), generator=generator)
    cursor = 0
    total_loss, correct, seen = 0.0, 0, 0
    for _ in range(steps):
        if cursor + batch_size > len(order):
            order = torch.randperm(len(y), generator=generator)
            cursor = 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        inputs = augment_batch(x[index], generator) if augment else x[index]
        logits = model(inputs)
        loss = loss_fn(logits, y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(index)
        correct += int((logits.argmax(1) == y[index]).sum())
        seen += len(index)
    return LocalResult(total_loss / max(seen, 1), correct / max(seen, 1), steps)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (BatchNorm uses its running statistics)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        total_loss += float(loss_fn(logits, y[start : start + batch_size]))
        correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
    return total_loss / max(len(y), 1), correct / max(len(y), 1)


def update_tensors(
    global_state: dict[str, torch.Tensor], local_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """global - local for floating tensors (weights and BatchNorm statistics); integer buffers as is."""
    update = {}
    for name, before in global_state.items():
        after = local_state[name].detach()
        if before.is_floating_point():
            update[name] = (before - after).contiguous()
        else:
            update[name] = after.clone().contiguous()
    return update
