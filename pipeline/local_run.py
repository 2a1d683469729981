"""`dagtrain run`: the run directory's own DAG, executed by the local runner on this machine."""

import json
import math
import signal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from node_payload.common.errors import UserError
from node_payload.common.run_config import RunConfig, read_run_config
from node_payload.common.run_layout import CONFIG_FILE, DAG_FILE, MODELS_DIR, REPORT_FILE
from node_payload.faults import SLOWDOWN_VARIABLE
from pipeline.local_runner import DagInterrupted, run_dag
from pipeline.mirrors import EmbeddedMirrors, serve
from pipeline.progress import RunProgress
from pipeline.rescue import reopen_missing_nodes
from pipeline.run_lock import RunLock
from pipeline.run_reset import reset_run
from pipeline.run_summary import RunStopped, summary_line


def mirror_ports(mirrors: list[str]) -> list[int]:
    """The ports of the planned embedded mirrors: a run keeps the ports its config names."""
    return [int(url.rsplit(":", 1)[1].split("/")[0]) for url in mirrors]


def embedded_mirrors(run_dir: Path, config: RunConfig) -> EmbeddedMirrors:
    """The run's embedded mirrors on the ports its config names: its dataset, and its global
    models as they are published."""
    models = (config.run.run_id, run_dir / MODELS_DIR)
    return serve(Path(config.data.dataset), mirror_ports(config.data.mirrors), run_models=models)


def completed_report(run_dir: Path) -> dict[str, Any] | None:
    """The report of a run that completed, else None."""
    try:
        report = json.loads((run_dir / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return report if report.get("status") == "completed" else None


def run_local(
    run_dir: Path,
    slots: int = 2,
    show_progress: bool = True,
    slow_slots: dict[int, float] | None = None,
    force: bool = False,
    serial: bool = False,
    warm: bool = True,
    evictions: list[tuple[int, float]] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a planned run; returns report.json written by the DAG's FINAL node.

    A completed run is not run again: its report is returned as it is, unless `force` resets the
    run to its planned state first (pipeline.run_reset). One process at a time runs a run
    directory (pipeline.run_lock); SIGINT or SIGTERM stop it resumably (RunStopped).
    `slow_slots` (slot -> factor >= 1) makes node jobs started in those slots work that many
    times as long: a local stand-in for slower machines (on a pool, use `[faults] slow`).
    `serial` runs one node at a time in a fixed order, so that the models never depend on
    timing, an asynchronous run's included (pipeline.local_runner.serial_order).
    `warm` starts the jobs that run the payload with the configured Pythons in a warm
    interpreter that has torch imported (pipeline.local_runner.warm_pool); False: fresh processes.
    `evictions` (slot, seconds) evict the job on that slot that many seconds into the run: it
    goes back to the queue and resumes from its checkpoint (pipeline.local_runner.slots).
    """
    for slot, factor in (slow_slots or {}).items():
        if not 0 <= slot < slots or not (math.isfinite(factor) and factor >= 1):
            raise UserError(
                f"slow slot {slot}={factor}: slots are numbered 0 to {slots - 1} and a factor "
                "is a number >= 1"
            )
    for slot, seconds in evictions or []:
        if not 0 <= slot < slots or not (math.isfinite(seconds) and seconds >= 0):
            raise UserError(
                f"--evict {slot}@{seconds}: slots are numbered 0 to {slots - 1} and the time is "
                "seconds >= 0 from the run's start"
            )
    slot_environment = {
        slot: {SLOWDOWN_VARIABLE: repr(float(factor))}
        for slot, factor in (slow_slots or {}).items()
    }
    if not (run_dir / DAG_FILE).is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir}: not a run directory (no {DAG_FILE}); plan one first")
    config = read_run_config(run_dir / CONFIG_FILE)
    console = Console(stderr=True, quiet=not show_progress)
    with RunLock(run_dir, "run") as lock:
        if lock.stale is not None:
            console.print(
                escape(f"taking over from {lock.stale.describe()}, which ended without "
                       "releasing the run"), highlight=False, soft_wrap=True,
            )  # fmt: skip
        done = completed_report(run_dir)
        if done is not None and not force:
            console.print(summary_line(done, run_dir, reused=True), highlight=False, soft_wrap=True)
            return done
        if force:
            reset_run(run_dir, config)
        try:
            _execute(
                run_dir, config, slots, slot_environment, console, serial, warm, evictions or []
            )
        except DagInterrupted as exc:
            raise RunStopped(run_dir, exc.exit_code) from None
        except KeyboardInterrupt:
            raise RunStopped(run_dir, 128 + signal.SIGINT) from None
    report_path = run_dir / REPORT_FILE
    if not report_path.is_file():
        raise UserError(f"{run_dir}: the run ended without {REPORT_FILE}; see report.err")
    report = json.loads(report_path.read_text())
    console.print(summary_line(report, run_dir), highlight=False, soft_wrap=True)
    return report


def _execute(
    run_dir: Path,
    config: RunConfig,
    slots: int,
    slot_environment: dict[int, dict[str, str]],
    console: Console,
    serial: bool,
    warm: bool,
    evictions: list[tuple[int, float]],
) -> None:
    """Missing nodes reopened, embedded mirrors up, then the DAG with a live progress table."""
    reopened = reopen_missing_nodes(run_dir)
    if reopened:
        console.print(f"resuming: missing nodes run again: {', '.join(reopened)}")
    mirrors = embedded_mirrors(run_dir, config) if config.data.embedded else None
    try:
        budget = config.update_budget if config.is_async else None
        run = config.run
        with RunProgress(run_dir, run.rounds, run.nodes, console, budget) as p:
            run_dag(
                run_dir / DAG_FILE,
                slots=slots,
                on_event=p.on_event,
                slot_environment=slot_environment,
                serial=serial,
                warm_pythons=_configured_pythons(config) if warm else (),
                evictions=evictions,
                repeated_evictions={n: (s, times) for n, s, times in config.faults.evict},
            )
    finally:
        if mirrors is not None:
            mirrors.close()


def _configured_pythons(config: RunConfig) -> set[str]:
    """The Pythons the submit files run the payload with (none from an env_tarball)."""
    execution = config.execution
    return {python for python in (execution.python, execution.submit_python) if python}
