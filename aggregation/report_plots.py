"""The report's figures: accuracy.png (held-out accuracy by step and by wall time) and
confusion.png (the final model's confusion matrices), for either mode."""

from pathlib import Path
from typing import Any


def wall_times(rounds: list[dict[str, Any]]) -> list[float] | None:
    """When each round's model was evaluated, in seconds since the first round's node jobs
    started: the scale asynchronous runs use. None when a round (written before rounds recorded
    started_at) cannot say when it began."""
    if any("started_at" not in r for r in rounds):
        return None
    start = min((r["started_at"] for r in rounds), default=0.0)
    return [r["started_at"] + r["seconds"] - start for r in rounds]


def curves(report: dict[str, Any]) -> tuple[str, list[float], list[float] | None, list[dict]]:
    """(step label, x by step, x by wall time or None, the rows with the accuracies)."""
    if report.get("mode") == "async":
        rows = report["evaluations"]
        return "model version", [r["version"] for r in rows], [r["seconds"] for r in rows], rows
    rows = report["rounds"]
    return "round", [r["round"] + 1 for r in rows], wall_times(rows), rows


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    """Fragment and image accuracy against the step and, when known, against wall time."""
    plt = _pyplot()
    label, steps, elapsed, rows = curves(report)
    axes_x = [(steps, label)]
    if elapsed is not None:
        axes_x.append((elapsed, "wall time since the first job started (s)"))
    fig, axes = plt.subplots(
        1, len(axes_x), figsize=(4.5 * len(axes_x), 3.6), constrained_layout=True, squeeze=False
    )
    for axis, (x, xlabel) in zip(axes[0], axes_x, strict=True):
        axis.plot(x, [r["accuracy"] for r in rows], marker="o", label="fragments")
        voted = [
            (at, r["image_accuracy"])
            for at, r in zip(x, rows, strict=True)
            if "image_accuracy" in r
        ]
        if voted:
            axis.plot(*zip(*voted, strict=True), marker="s", label="images (mean softmax)")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("held-out accuracy")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right")
    fig.suptitle(f"{report['run']}: {report['nodes']} nodes, {report['status']}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(report: dict[str, Any], path: Path, title: str = "") -> None:
    """The final model's confusion matrices, fragments and images, with counts in the cells and
    each row shaded by its share (the diagonal is the class's recall); `dagtrain evaluate` draws
    its own under its title."""
    plt = _pyplot()
    classes = report["classes"]
    panels = [("fragments", report["final_confusion"])]
    if report.get("final_image_confusion") is not None:
        panels.append(("images", report["final_image_confusion"]))
    side = 1.2 + 0.45 * len(classes)
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(side * len(panels) + 1, side + 0.8),
        constrained_layout=True,
        squeeze=False,
    )
    for axis, (title, matrix) in zip(axes[0], panels, strict=True):
        shares = [[n / max(sum(row), 1) for n in row] for row in matrix]
        axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for i, row in enumerate(matrix):
            for j, n in enumerate(row):
                axis.text(
                    j,
                    i,
                    str(n),
                    ha="center",
                    va="center",
                    color="white" if shares[i][j] > 0.5 else "black",
                    fontsize=8,
                )
        axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        axis.set_yticks(range(len(classes)), classes)
        axis.set_xlabel("predicted class")
        axis.set_ylabel("true class")
        axis.set_title(f"{title}: accuracy {_share(matrix):.3f}")
    fig.suptitle(title or f"{report['run']}: final model on the held-out set")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _share(matrix: list[list[int]]) -> float:
    total = sum(map(sum, matrix))
    return sum(matrix[i][i] for i in range(len(matrix))) / max(total, 1)
