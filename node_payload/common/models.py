"""Model construction by name, so the planner, nodes and aggregator build identical networks.

torchvision is imported only for its architectures: importing it adds about 190 MB of resident
memory to torch's own, which a smallcnn job or `dagtrain predict` on a slide need not pay.
"""

from types import ModuleType

import torch
from torch import nn

from node_payload.common.errors import UserError

SMALL_CNN = "smallcnn"


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """Four conv blocks and global pooling: trains in seconds per round on one CPU core."""

    def __init__(self, num_classes: int, in_channels: int, width: int = 24) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(in_channels, width),
            _conv_block(width, width * 2),
            _conv_block(width * 2, width * 4),
            _conv_block(width * 4, width * 4),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """torchvision classifiers expect RGB; greyscale microscopy needs a one-channel stem."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            replacement = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                bias=module.bias is not None,
            )
            parent = model
            *path, last = name.split(".")
            for part in path:
                parent = getattr(parent, part)
            setattr(parent, last, replacement)
            return


def _torchvision() -> ModuleType:
    import torchvision

    return torchvision


def available_archs() -> list[str]:
    models = _torchvision().models
    return [SMALL_CNN, *models.list_models(module=models)]


def build_model(
    arch: str, num_classes: int, in_channels: int, seed: int | None = None
) -> nn.Module:
    """Build an untrained network; with a seed the initial weights are reproducible."""
    if seed is not None:
        torch.manual_seed(seed)
    if arch == SMALL_CNN:
        return SmallCNN(num_classes, in_channels)
    models = _torchvision().models
    if arch not in models.list_models(module=models):
        raise UserError(
            f"[model] arch = {arch!r} is not a known network; use {SMALL_CNN!r} or a torchvision "
            "classifier name such as 'resnet18' or 'mobilenet_v3_small'"
        )
    model = models.get_model(arch, weights=None, num_classes=num_classes)
    _adapt_first_conv(model, in_channels)
    return model
