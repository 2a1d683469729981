"""What an evaluation reports: fragment and image accuracy, per-class recall, precision and F1,
and confusion matrices.

Fragment accuracy scores tiles one by one; users of microscopy want the class of a whole image, so
each held-out image also gets one prediction, the argmax of the mean softmax over its unrotated
fragments (see aggregation.heldout.image_fragments). The one implementation of these metrics: the
rounds' and the FINAL report's held-out evaluation and `dagtrain evaluate` on new labelled images
(pipeline.inference.evaluate) both score with it.
"""

import copy
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from aggregation.heldout import HeldOut

# Rows per forward pass: as many as keep a batch's largest activation within this many bytes
# (half the last-level cache of the machine it was measured on), at most MAX_BATCH. Past it, a
# batch's activations spill to memory: smallcnn on 256 px tiles scores about twice as fast in
# batches of 2 as of 64, while a network that shrinks its input early keeps 64
# (docs/benchmarks.md, "Predict").
ACTIVATION_BUDGET = 16 << 20
MAX_BATCH = 64


def inference_copy(model: nn.Module) -> nn.Module:
    """A copy of the model in eval mode (BatchNorm uses its running statistics) that computes the
    same function faster: each Conv2d followed by a BatchNorm2d in a Sequential folded into one
    convolution, and channels-last weights, which torch's CPU convolutions and pooling run about
    twice as fast. Its outputs differ from the model's by float rounding only; the model itself,
    its mode and its memory layout are left as they are (a caller may go on training it)."""
    fast = copy.deepcopy(model).eval()
    for sequential in [m for m in fast.modules() if isinstance(m, nn.Sequential)]:
        for i, (first, second) in enumerate(itertools.pairwise(list(sequential))):
            folds = isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d)
            if folds and second.running_mean is not None:  # not when it normalises by the batch
                sequential[i] = fuse_conv_bn_eval(first, second)
                sequential[i + 1] = nn.Identity()
    return fast.to(memory_format=torch.channels_last)


@torch.no_grad()
def batch_size_for(fast: nn.Module, shape: tuple[int, ...]) -> int:
    """Rows per forward pass of an inference_copy for inputs of `shape` (channels, height,
    width): the largest activation of one row, from a zero input passed through with hooks on
    every leaf module, measured against ACTIVATION_BUDGET."""
    largest = 1

    def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    leaves = [m for m in fast.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(record) for m in leaves]
    try:
        fast(torch.zeros(1, *shape).contiguous(memory_format=torch.channels_last))
    finally:
        for hook in hooks:
            hook.remove()
    return max(1, min(MAX_BATCH, ACTIVATION_BUDGET // largest))


@torch.no_grad()
def logits(fast: nn.Module, x: torch.Tensor, classes: int, batch_size: int = 0) -> torch.Tensor:
    """The outputs of an inference_copy, batch by batch (`batch_size` rows, 0: batch_size_for),
    each batch channels-last as its weights are."""
    if len(x) == 0:
        return torch.empty(0, classes)
    batch_size = batch_size or batch_size_for(fast, tuple(x.shape[1:]))
    out = [
        fast(x[start : start + batch_size].contiguous(memory_format=torch.channels_last))
        for start in range(0, len(x), batch_size)
    ]
    return torch.cat(out)


def confusion_matrix(truth: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    """Counts by true class (rows) and predicted class (columns)."""
    flat = torch.bincount(truth * classes + predicted, minlength=classes * classes)
    return flat.reshape(classes, classes)


def recall(confusion: torch.Tensor) -> list[float | None]:
    """Per true class, the share predicted as itself; None for a class with no samples."""
    totals = confusion.sum(dim=1).tolist()
    hits = confusion.diagonal().tolist()
    return [hit / total if total else None for hit, total in zip(hits, totals, strict=True)]


def precision(confusion: torch.Tensor) -> list[float | None]:
    """Per predicted class, the share that truly is that class; None for a class never predicted."""
    totals = confusion.sum(dim=0).tolist()
    hits = confusion.diagonal().tolist()
    return [hit / total if total else None for hit, total in zip(hits, totals, strict=True)]


def f1(confusion: torch.Tensor) -> list[float | None]:
    """Per class, the harmonic mean of precision and recall; None when either is undefined."""
    return [
        None if p is None or r is None else (2 * p * r / (p + r) if p + r else 0.0)
        for p, r in zip(precision(confusion), recall(confusion), strict=True)
    ]


class ImageVotes:
    """Each image's class probabilities, the mean of its fragments' softmax outputs, summed batch
    by batch: an image of any number of fragments is scored in memory O(classes)."""

    def __init__(self, images: int, classes: int) -> None:
        self.sums = torch.zeros(images, classes, dtype=torch.float64)
        self.counts = torch.zeros(images, dtype=torch.long)

    def add(self, probabilities: torch.Tensor, image_of: torch.Tensor) -> None:
        self.sums.index_add_(0, image_of, probabilities.double())
        self.counts += torch.bincount(image_of, minlength=len(self.counts))

    def probabilities(self) -> torch.Tensor:
        return self.sums / self.counts.clamp(min=1)[:, None]

    def votes(self) -> torch.Tensor:
        """Each image's class: the argmax of its mean softmax."""
        return self.probabilities().argmax(dim=1)


def image_votes(probabilities: torch.Tensor, image_of: torch.Tensor, images: int) -> torch.Tensor:
    """Each image's class: the argmax of the mean of its fragments' softmax outputs."""
    votes = ImageVotes(images, probabilities.shape[1])
    votes.add(probabilities, image_of)
    return votes.votes()


def accuracy(confusion: torch.Tensor) -> float:
    return int(confusion.diagonal().sum()) / max(int(confusion.sum()), 1)


def level_metrics(names: list[str], confusion: torch.Tensor, prefix: str = "") -> dict[str, Any]:
    """Accuracy, per-class recall, precision and F1 (by class name) and the confusion matrix
    (rows: true class, columns: predicted, in the order of `names`), keys prefixed (`image_`)."""
    by_name = {
        "recall": recall(confusion),
        "precision": precision(confusion),
        "f1": f1(confusion),
    }
    return {
        f"{prefix}accuracy": accuracy(confusion),
        **{f"{prefix}{k}": dict(zip(names, v, strict=True)) for k, v in by_name.items()},
        f"{prefix}confusion": confusion.tolist(),
    }


def heldout_metrics(model: nn.Module, heldout: HeldOut) -> dict[str, Any]:
    """Fragment accuracy and loss, image accuracy, and both levels' per-class metrics and
    confusion matrix (level_metrics)."""
    names, classes = heldout.classes, len(heldout.classes)
    fast = inference_copy(model)
    # both sets are fragments of the same size: one look at the network serves both passes
    rows = batch_size_for(fast, tuple(heldout.x.shape[1:])) if len(heldout.x) else 0
    fragment_logits = logits(fast, heldout.x, classes, rows)
    loss = float(F.cross_entropy(fragment_logits, heldout.y)) if len(heldout.y) else 0.0
    fragments = confusion_matrix(heldout.y, fragment_logits.argmax(dim=1), classes)
    probabilities = logits(fast, heldout.image_x, classes, rows).softmax(dim=1)
    voted = image_votes(probabilities, heldout.image_of, len(heldout.image_y))
    images = confusion_matrix(heldout.image_y, voted, classes)
    return {
        "loss": loss,
        "heldout_samples": len(heldout.y),
        "heldout_images": len(heldout.image_y),
        "classes": names,
        **level_metrics(names, fragments),
        **level_metrics(names, images, "image_"),
    }


FINAL_KEYS = tuple(
    f"{level}{key}"
    for key in ("accuracy", "recall", "precision", "f1", "confusion")
    for level in ("", "image_")
)


def final_metrics(last: dict[str, Any] | None) -> dict[str, Any]:
    """The last evaluation's figures as the report's final_* keys (None before any evaluation,
    and for keys a run written by an older dagtrain did not record)."""
    last = last or {}
    return {"classes": last.get("classes"), **{f"final_{k}": last.get(k) for k in FINAL_KEYS}}
