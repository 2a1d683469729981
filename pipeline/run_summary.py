"""The one line `dagtrain run` ends with: how the run ended, and what to do next."""

import shlex
import signal
from pathlib import Path
from typing import Any

from rich.markup import escape

from node_payload.common.run_layout import REPORT_FILE, round_dir


def resume_command(run_dir: Path) -> str:
    return f"dagtrain run {shlex.quote(str(run_dir))}"


class RunStopped(Exception):
    """A signal stopped the run before it ended; finished nodes are kept and it resumes."""

    def __init__(self, run_dir: Path, exit_code: int) -> None:
        name = signal.Signals(exit_code - 128).name
        super().__init__(f"stopped by {name}; resume with: {resume_command(run_dir)}")
        self.exit_code = exit_code


def _where_to_look(report: dict[str, Any], run_dir: Path) -> str:
    """The failed round's aggregation log when it ran (quorum, invalid updates), else the view
    that names the failed nodes."""
    status = f"`dagtrain status {shlex.quote(str(run_dir))}`"
    if report.get("mode") != "async":
        err = round_dir(run_dir, report["rounds_completed"]) / "aggregate.err"
        if err.is_file() and err.stat().st_size:
            return f"see {err} and {status}"
    return f"see {status} and the failed nodes' job.err"


def summary_line(report: dict[str, Any], run_dir: Path, reused: bool = False) -> str:
    """`completed: 6/6 rounds, final held-out accuracy 0.913 (whole images 0.958); report: ...`,
    or for a failed run where to look and how to resume (never an accuracy of None)."""
    if report["status"] != "completed":
        advice = f"{_where_to_look(report, run_dir)}; fix the cause, then resume with: "
        return f"[bold red]failed[/]: {escape(report['summary'])}; " + escape(
            advice + resume_command(run_dir)
        )
    accuracy = report.get("final_accuracy")
    shown = f"{accuracy:.3f}" if isinstance(accuracy, float) else "-"
    images = report.get("final_image_accuracy")  # runs before image accuracy have none
    if isinstance(images, float):
        shown += f" (whole images {images:.3f})"
    line = escape(
        f"{report['summary']}, final held-out accuracy {shown}; report: {run_dir / REPORT_FILE}"
    )
    if reused:
        return f"[bold]already completed[/]: {line}; nothing to do (--force runs it again)"
    return f"[bold]completed[/]: {line}"
