"""`dagtrain predict`: each image's class probabilities, the mean softmax of its fragments.

Images are cut as the run's dataset was (pipeline.inference.tiling) and classified in batches
by the model's inference_copy (BatchNorm folded, channels-last: the same outputs, faster);
an image's probabilities are summed batch by batch (aggregation.heldout_metrics.ImageVotes, the
vote the held-out evaluation takes), so memory stays bounded whatever the image's size. An image
that cannot be used is one failure naming the file, and the other images go on.
"""

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from aggregation.heldout import unrotated
from aggregation.heldout_metrics import ImageVotes, batch_size_for, inference_copy
from node_payload.batches import to_tensor
from node_payload.common.atomic_file import write_text
from node_payload.common.errors import UserError
from node_payload.common.threads import torch_threads
from pipeline.dataset_prepare import images_in, parse_angles
from pipeline.inference.run_model import RunModel, load_model
from pipeline.inference.tiling import BadInput, Probed, bands, check

DEFAULT_BATCH = 0  # as many fragments as heldout_metrics.batch_size_for finds room for
OUTPUT_SUFFIXES = (".csv", ".json")


@dataclass(frozen=True)
class Failure:
    """An image that was not classified, and why (the message names the file)."""

    path: str
    error: str


@dataclass(frozen=True)
class Prediction:
    path: str
    predicted: str  # the class with the highest mean probability
    probabilities: dict[str, float]  # by class name, in the run's class order; they sum to 1
    fragments: int  # positions x angles


@dataclass(frozen=True)
class Predictions:
    """What `dagtrain predict` prints or writes."""

    model: str  # the model file
    round: int
    classes: list[str]
    angles: list[int]  # the rotations each position was classified at
    images: list[Prediction]
    failures: list[Failure]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Scored:
    """One image's scores: what predict reports and evaluate counts."""

    path: Path
    probabilities: torch.Tensor  # the mean of the fragments' softmax outputs (float64)
    predicted: int  # the image's vote: the argmax of those
    fragment_classes: torch.Tensor  # each fragment's most probable class


def input_images(inputs: Sequence[Path]) -> list[Path]:
    """Image files as given, and the PNG, JPEG and TIFF files in folders (recursively)."""
    found: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            inside = images_in(path)
            if not inside:
                raise UserError(
                    f"{path}: holds no PNG, JPEG or TIFF images; give images or folders of them"
                )
            found += inside
        else:
            found.append(path)  # a missing or unreadable file is one failure, named
    if not found:
        raise UserError("no images given: name image files or folders of images")
    return found


def angles_for(run: RunModel, tta: str | None) -> list[int]:
    """The rotations to classify each position at: `tta` (start:stop:step in degrees), else the
    dataset's angle closest to 0 degrees, the one the held-out images vote with."""
    if tta:
        return list(range(*parse_angles(tta)))
    angles = run.manifest.angles
    return [angles[unrotated(angles)]]


def _batches(bands: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The fragments of consecutive bands in batches of `size` (the last one may be smaller)."""
    rest: np.ndarray | None = None
    for band in bands:
        joined = band if rest is None else np.concatenate([rest, band])
        whole = len(joined) // size * size
        for start in range(0, whole, size):
            yield joined[start : start + size]
        rest = joined[whole:] if whole < len(joined) else None
    if rest is not None:
        yield rest


def _progress(enabled: bool) -> Progress:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=Console(stderr=True), disable=not enabled)


def _score_one(
    run: RunModel,
    fast: nn.Module,
    probed: Probed,
    angles: list[int],
    batch: int,
    done: Callable[[int], None],
) -> Scored:
    votes = ImageVotes(1, len(run.classes))
    # one array for every fragment's class: a small tensor kept from each batch would pin the
    # heap between the batches' large buffers, which then grows (+0.3 GB on a 20,000 px slide)
    classes = torch.empty(probed.fragments(len(angles)), dtype=torch.long)
    start = 0
    with torch.inference_mode():
        for chunk in _batches(bands(probed, run.tiling, angles), batch):
            x = to_tensor(chunk, run.image_size).contiguous(memory_format=torch.channels_last)
            probabilities = fast(x).softmax(dim=1)
            votes.add(probabilities, torch.zeros(len(chunk), dtype=torch.long))
            classes[start : start + len(chunk)] = probabilities.argmax(dim=1)
            start += len(chunk)
            done(len(chunk))
    return Scored(probed.path, votes.probabilities()[0], int(votes.votes()[0]), classes)


def score(
    run: RunModel,
    paths: Sequence[Path],
    angles: list[int],
    batch: int = DEFAULT_BATCH,
    workers: int = 0,
    progress: bool = False,
) -> list[Scored | Failure]:
    """Each image's scores, or why it could not be scored, in the order of `paths`."""
    if batch < 0 or workers < 0:
        raise UserError(
            f"--batch must be at least 0 (not {batch}; 0: as many as fit) and --workers at "
            f"least 0 (not {workers})"
        )
    checked: list[Probed | Failure] = []
    for path in paths:
        try:
            checked.append(check(path, run.tiling))
        except BadInput as exc:
            checked.append(Failure(str(path), str(exc)))
    total = sum(c.fragments(len(angles)) for c in checked if isinstance(c, Probed))
    results: list[Scored | Failure] = []
    fast = inference_copy(run.model)
    batch = batch or batch_size_for(fast, (run.channels, run.image_size, run.image_size))
    with torch_threads(workers), _progress(progress) as bar:
        images = bar.add_task("images", total=len(paths))
        fragments = bar.add_task("fragments", total=total)
        for item in checked:
            if isinstance(item, Probed):
                try:
                    advance = partial(bar.advance, fragments)
                    item = _score_one(run, fast, item, angles, batch, advance)
                except BadInput as exc:
                    item = Failure(str(item.path), str(exc))
            results.append(item)
            bar.advance(images)
    return results


def predict(
    run: RunModel | Path,
    inputs: Sequence[Path],
    round: int | None = None,
    batch: int = DEFAULT_BATCH,
    workers: int = 0,
    tta: str | None = None,
    progress: bool = False,
) -> Predictions:
    """Classify images (files or folders of them) with a run's model (a RunModel from
    load_model, or a run directory and `round`, by default its last model)."""
    if not isinstance(run, RunModel):
        run = load_model(run, round)
    angles = angles_for(run, tta)
    images, failures = [], []
    for item in score(run, input_images(inputs), angles, batch, workers, progress):
        if isinstance(item, Failure):
            failures.append(item)
            continue
        probabilities = item.probabilities.tolist()
        images.append(
            Prediction(
                str(item.path),
                run.classes[item.predicted],
                dict(zip(run.classes, probabilities, strict=True)),
                len(item.fragment_classes),
            )
        )
    return Predictions(str(run.path), run.version, run.classes, angles, images, failures)


def as_csv(predictions: Predictions) -> str:
    """One row per classified image: path, predicted class, fragments, then each class's
    probability (columns p_CLASS)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "predicted", "fragments", *(f"p_{c}" for c in predictions.classes)])
    for p in predictions.images:
        writer.writerow(
            [p.path, p.predicted, p.fragments, *(f"{v:.6f}" for v in p.probabilities.values())]
        )
    return text.getvalue()


def check_output_suffix(out: Path) -> None:
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"--out {out}: name a .csv or a .json file")


def write_predictions(predictions: Predictions, out: Path) -> None:
    """As CSV or JSON by the file's suffix, atomically."""
    check_output_suffix(out)
    if out.suffix.lower() == ".json":
        text = json.dumps(predictions.to_dict(), indent=1) + "\n"
    else:
        text = as_csv(predictions)
    try:
        write_text(out, text)
    except OSError as exc:
        raise UserError(
            f"{out}: cannot write the predictions ({exc.strerror}); choose another --out"
        ) from None
