"""The trainers' SGD: torch.optim.SGD's results bit for bit, without importing torch._dynamo."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from node_payload.common.models import build_model
from node_payload.sgd import Sgd


def _twin_models(seed: int) -> tuple[nn.Module, nn.Module]:
    return build_model("smallcnn", 3, 3, seed), build_model("smallcnn", 3, 3, seed)


def _step(
    model: nn.Module, optimizer: Sgd | torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


@pytest.mark.parametrize(
    ("momentum", "nesterov", "weight_decay"),
    [(0.9, False, 0.0), (0.9, True, 5e-4), (0.0, False, 1e-3), (0.5, True, 0.0)],
)
def test_steps_equal_torch_sgd_bit_for_bit(
    momentum: float, nesterov: bool, weight_decay: float
) -> None:
    ours, reference = _twin_models(3)
    sgd = Sgd(ours.parameters(), 0.05, momentum, nesterov, weight_decay)
    torch_sgd = torch.optim.SGD(
        reference.parameters(),
        lr=0.05,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
    )
    generator = torch.Generator().manual_seed(0)
    for step in range(6):
        lr = 0.05 * (1 - step / 10)  # the schedule moves the rate between steps
        sgd.lr = lr
        for group in torch_sgd.param_groups:
            group["lr"] = lr
        x = torch.randn(8, 3, 32, 32, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        _step(ours, sgd, x, y)
        _step(reference, torch_sgd, x, y)
    for (name, a), b in zip(
        ours.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    if momentum:
        theirs = {i: s["momentum_buffer"] for i, s in torch_sgd.state_dict()["state"].items()}
        assert sgd.momentum_buffers().keys() == theirs.keys()
        assert all(torch.equal(sgd.momentum_buffers()[i], theirs[i]) for i in theirs)


def test_a_parameter_without_a_gradient_is_left_alone() -> None:
    used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    sgd = Sgd([used, unused], 0.1, 0.9, False, 0.01)
    (used * 2).sum().backward()
    sgd.step()
    assert torch.equal(unused, torch.ones(3))
    assert list(sgd.momentum_buffers()) == [0]


def test_training_does_not_import_torch_dynamo() -> None:
    """torch.optim's optimizers import torch._dynamo (seconds of every fresh node job)."""
    script = (
        "import sys, torch\n"
        "from node_payload.common.models import build_model\n"
        "from node_payload.train import Schedule, train_local\n"
        "model = build_model('smallcnn', 3, 3)\n"
        "x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))\n"
        "train_local(model, x, y, steps=2, batch_size=8, schedule=Schedule(0.1, 'constant', 2),\n"
        "            first_step=0, momentum=0.9, nesterov=True, weight_decay=1e-4,\n"
        "            augment=True, seed=1)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False", done.stderr
