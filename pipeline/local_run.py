"""`dagtrain run`: the run directory's own DAG, executed by the local runner on this machine."""

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console

from node_payload.errors import UserError
from node_payload.faults import SLOWDOWN_VARIABLE
from node_payload.run_config import read_run_config, update_budget
from node_payload.run_layout import CONFIG_FILE, DAG_FILE, REPORT_FILE
from pipeline.local_runner import run_dag
from pipeline.mirrors import serve
from pipeline.progress import RunProgress
from pipeline.rescue import reopen_missing_nodes


def mirror_ports(mirrors: list[str]) -> list[int]:
    """The ports of the planned embedded mirrors: a run keeps the ports its config names."""
    return [int(url.rsplit(":", 1)[1].split("/")[0]) for url in mirrors]


def run_local(
    run_dir: Path,
    slots: int = 2,
    show_progress: bool = True,
    slow_slots: dict[int, float] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a planned run; returns report.json written by the DAG's FINAL node.

    `slow_slots` (slot -> factor >= 1) makes node jobs started in those slots work that many
    times as long: a local stand-in for slower machines (on a pool, use `[faults] slow`).
    """
    for slot, factor in (slow_slots or {}).items():
        if not 0 <= slot < slots or not (math.isfinite(factor) and factor >= 1):
            raise UserError(
                f"slow slot {slot}={factor}: slots are numbered 0 to {slots - 1} and a factor "
                "is a number >= 1"
            )
    slot_environment = {
        slot: {SLOWDOWN_VARIABLE: repr(float(factor))}
        for slot, factor in (slow_slots or {}).items()
    }
    if not (run_dir / DAG_FILE).is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir}: not a run directory (no {DAG_FILE}); plan one first")
    config = read_run_config(run_dir / CONFIG_FILE)
    console = Console(stderr=True, quiet=not show_progress)
    reopened = reopen_missing_nodes(run_dir)
    if reopened:
        console.print(f"resuming: missing nodes run again: {', '.join(reopened)}")
    data = config["data"]
    mirrors = (
        serve(Path(data["dataset"]), mirror_ports(data["mirrors"]))
        if data.get("embedded")
        else None
    )
    try:
        budget = update_budget(config) if config["run"]["mode"] == "async" else None
        run = config["run"]
        with RunProgress(run_dir, run["rounds"], run["nodes"], console, budget) as p:
            run_dag(
                run_dir / DAG_FILE,
                slots=slots,
                on_event=p.on_event,
                slot_environment=slot_environment,
            )
    finally:
        if mirrors is not None:
            mirrors.close()
    report_path = run_dir / REPORT_FILE
    if not report_path.is_file():
        raise UserError(f"{run_dir}: the run ended without {REPORT_FILE}; see report.err")
    report = json.loads(report_path.read_text())
    console.print(
        f"[bold]{report['status']}[/]: {report['summary']}, final held-out accuracy "
        f"{report['final_accuracy']}; report: {report_path}"
    )
    return report
