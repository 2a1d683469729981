"""`dagtrain evaluate`: a run's model scored on new labelled images (an ImageFolder tree).

Every fragment of every image is scored (fragment accuracy), and every image votes with the mean
softmax of its fragments (image accuracy); both levels get per-class recall, precision and F1 and
a confusion matrix from aggregation.heldout_metrics, the code that scores the run's own held-out
set in round.json and report.json, so the two evaluations cannot drift apart.
"""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from aggregation.heldout_metrics import confusion_matrix, level_metrics
from aggregation.report_plots import plot_confusion
from node_payload.common.atomic_file import write_text
from node_payload.common.errors import UserError
from pipeline.dataset_prepare import scan
from pipeline.inference.predict import DEFAULT_BATCH, Failure, angles_for, score
from pipeline.inference.run_model import RunModel, check_output, load_model

EVALUATION_FILE = "evaluation.json"
CONFUSION_FILE = "confusion.png"


def labelled_images(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(image, class index) for every image of the tree, its class folders matched to the run's
    classes by name: a folder of another class, or a class without a folder, is refused."""
    names, files = scan(folder)
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise UserError(
            f"{folder / unknown[0]}: the run has no class {unknown[0]!r} (its classes: "
            f"{', '.join(classes)}); rename the folder to the class its images are, or move it "
            f"out of {folder}"
        )
    missing = [name for name in classes if name not in names]
    if missing:
        raise UserError(
            f"{folder}: no folder for the run's class {', '.join(map(repr, missing))}; add "
            f"{folder / missing[0]} with images of that class (class folders: "
            f"{', '.join(classes)})"
        )
    return [
        (path, classes.index(name))
        for name, group in zip(names, files, strict=True)
        for path in group
    ]


def evaluate(
    run: RunModel | Path,
    labelled_dir: Path,
    round: int | None = None,
    out_dir: Path | None = None,
    batch: int = DEFAULT_BATCH,
    workers: int = 0,
    tta: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score a run's model (a RunModel, or a run directory and `round`, by default its last
    model) on labelled images; with `out_dir`, write evaluation.json and confusion.png there."""
    if not isinstance(run, RunModel):
        run = load_model(run, round)
    if out_dir is not None:
        out_dir = check_output(run.run_dir, out_dir)
    labelled_dir = Path(labelled_dir).resolve()
    labelled = labelled_images(labelled_dir, run.classes)
    angles = angles_for(run, tta)
    classes = len(run.classes)
    fragments = torch.zeros(classes, classes, dtype=torch.long)
    truth, voted, images, failures = [], [], [], []
    scored = score(run, [path for path, _ in labelled], angles, batch, workers, progress)
    for (path, label), item in zip(labelled, scored, strict=True):
        if isinstance(item, Failure):
            failures.append(asdict(item))
            continue
        n = len(item.fragment_classes)
        fragments += confusion_matrix(torch.full((n,), label), item.fragment_classes, classes)
        truth.append(label)
        voted.append(item.predicted)
        images.append(
            {
                "path": str(path),
                "class": run.classes[label],
                "predicted": run.classes[item.predicted],
                "fragments": n,
            }
        )
    if not images:
        raise UserError(
            f"{labelled_dir}: none of its {len(labelled)} images could be classified; the first: "
            f"{failures[0]['error']}"
        )
    by_image = confusion_matrix(torch.tensor(truth), torch.tensor(voted), classes)
    result = {
        "model": str(run.path),
        "round": run.version,
        "labelled_dir": str(labelled_dir),
        "classes": run.classes,
        "angles": angles,
        "images": len(images),
        "fragments": int(fragments.sum()),
        **level_metrics(run.classes, fragments),
        **level_metrics(run.classes, by_image, "image_"),
        "per_image": images,
        "failures": failures,
    }
    if out_dir is not None:
        write_evaluation(result, out_dir, run.config.run.name)
    return result


def write_evaluation(result: dict[str, Any], out_dir: Path, run_name: str) -> None:
    """evaluation.json and confusion.png (fragments and images) in out_dir."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / EVALUATION_FILE, json.dumps(result, indent=1) + "\n")
    except OSError as exc:
        raise UserError(
            f"{out_dir}: cannot write the evaluation ({exc.strerror}); choose another --out"
        ) from None
    figure = {
        "classes": result["classes"],
        "final_confusion": result["confusion"],
        "final_image_confusion": result["image_confusion"],
    }
    title = f"{run_name}, round {result['round']}: {Path(result['labelled_dir']).name}"
    plot_confusion(figure, out_dir / CONFUSION_FILE, title)


def summary(result: dict[str, Any]) -> str:
    """What `dagtrain evaluate` prints: both accuracies, and per class the image-level figures."""

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    width = max(len("class"), *map(len, result["classes"]))
    lines = [
        f"round {result['round']}: fragment accuracy {result['accuracy']:.3f} "
        f"({result['fragments']} fragments), image accuracy {result['image_accuracy']:.3f} "
        f"({result['images']} images)",
        f"{'class':<{width}}  precision  recall  f1     (images)",
    ]
    for name in result["classes"]:
        figures = (result[f"image_{k}"][name] for k in ("precision", "recall", "f1"))
        precision, recall, f1 = map(cell, figures)
        lines.append(f"{name:<{width}}  {precision:<9}  {recall:<6}  {f1}")
    return "\n".join(lines)
