"""What an evaluation on the held-out set reports: fragment and image accuracy, per-class recall
and confusion matrices.

Fragment accuracy scores tiles one by one; users of microscopy want the class of a whole image, so
each held-out image also gets one prediction, the argmax of the mean softmax over its unrotated
fragments (see aggregation.heldout.image_fragments).
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aggregation.heldout import HeldOut


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, classes: int, batch_size: int = 256) -> torch.Tensor:
    """The model's outputs in eval mode (BatchNorm uses its running statistics), batch by batch."""
    model.eval()
    out = [model(x[start : start + batch_size]) for start in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, classes)


def confusion_matrix(truth: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    """Counts by true class (rows) and predicted class (columns)."""
    flat = torch.bincount(truth * classes + predicted, minlength=classes * classes)
    return flat.reshape(classes, classes)


def recall(confusion: torch.Tensor) -> list[float | None]:
    """Per true class, the share predicted as itself; None for a class with no samples."""
    totals = confusion.sum(dim=1).tolist()
    hits = confusion.diagonal().tolist()
    return [hit / total if total else None for hit, total in zip(hits, totals, strict=True)]


def image_votes(probabilities: torch.Tensor, image_of: torch.Tensor, images: int) -> torch.Tensor:
    """Each image's class: the argmax of the mean of its fragments' softmax outputs."""
    sums = torch.zeros(images, probabilities.shape[1], dtype=probabilities.dtype)
    sums.index_add_(0, image_of, probabilities)
    counts = torch.bincount(image_of, minlength=images).clamp(min=1)
    return (sums / counts[:, None]).argmax(dim=1)


def accuracy(confusion: torch.Tensor) -> float:
    return int(confusion.diagonal().sum()) / max(int(confusion.sum()), 1)


def heldout_metrics(model: nn.Module, heldout: HeldOut) -> dict[str, Any]:
    """Fragment accuracy and loss, image accuracy, and both levels' recall (by class name) and
    confusion matrix (rows: true class, columns: predicted, in the order of `classes`)."""
    names, classes = heldout.classes, len(heldout.classes)
    fragment_logits = logits(model, heldout.x, classes)
    loss = float(F.cross_entropy(fragment_logits, heldout.y)) if len(heldout.y) else 0.0
    fragments = confusion_matrix(heldout.y, fragment_logits.argmax(dim=1), classes)
    probabilities = logits(model, heldout.image_x, classes).softmax(dim=1)
    voted = image_votes(probabilities, heldout.image_of, len(heldout.image_y))
    images = confusion_matrix(heldout.image_y, voted, classes)
    return {
        "accuracy": accuracy(fragments),
        "image_accuracy": accuracy(images),
        "loss": loss,
        "heldout_samples": len(heldout.y),
        "heldout_images": len(heldout.image_y),
        "classes": names,
        "recall": dict(zip(names, recall(fragments), strict=True)),
        "image_recall": dict(zip(names, recall(images), strict=True)),
        "confusion": fragments.tolist(),
        "image_confusion": images.tolist(),
    }


FINAL_KEYS = (
    "accuracy",
    "image_accuracy",
    "recall",
    "image_recall",
    "confusion",
    "image_confusion",
)


def final_metrics(last: dict[str, Any] | None) -> dict[str, Any]:
    """The last evaluation's figures as the report's final_* keys (None before any evaluation,
    and for keys a run written by an older dagtrain did not record)."""
    last = last or {}
    return {"classes": last.get("classes"), **{f"final_{k}": last.get(k) for k in FINAL_KEYS}}
