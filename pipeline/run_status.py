"""What a run is doing, read from the files DAGMan (or the local runner) and the jobs write.

The NODE_STATUS_FILE says which nodes are done, failed or queued; it is rewritten only every few
seconds, so the nodes' job event logs (read with htcondor2.JobEventLog) refine a queued node into
idle, running or held, and count its tries across submissions of the DAG. Round metrics come from
rounds/rRRR/round.json. dagman.out is never parsed: its format is meant for people, not tools.
Both a pool and the local runner write these files in the same format, so one view serves both.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import classad2
import htcondor2
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from aggregation.async_state import lane_length
from node_payload.common.errors import UserError
from node_payload.common.run_config import RunConfig, read_run_config
from node_payload.common.run_layout import (
    ASYNC_STATE,
    CONFIG_FILE,
    DAG_FILE,
    MISSING_MARK,
    REPORT_FILE,
    STATUS_FILE,
    aggregate_name,
    lane_job_dir,
    lane_job_name,
    lane_tag,
    node_dir,
    node_name,
    round_dir,
    round_metrics_path,
    round_tag,
)
from pipeline.local_runner.journal import journal_path
from pipeline.run_lock import recorded_holder

# NodeStatus and DagStatus codes of the NODE_STATUS_FILE (DAGMan manual).
NOT_READY, READY, PRERUN, SUBMITTED, POSTRUN, DONE, ERROR, FUTILE = range(8)
NODE_STATES = ("waiting", "idle", "running", "held", "done", "failed")

_JOB_EVENTS = {
    htcondor2.JobEventType.SUBMIT: "idle",
    htcondor2.JobEventType.JOB_RELEASED: "idle",
    htcondor2.JobEventType.JOB_EVICTED: "idle",
    htcondor2.JobEventType.EXECUTE: "running",
    htcondor2.JobEventType.JOB_HELD: "held",
    htcondor2.JobEventType.JOB_TERMINATED: "ended",
    htcondor2.JobEventType.JOB_ABORTED: "ended",
}
_ACTIVE = ("idle", "running", "held")
STOPPED = "stopped (resumable)"


@dataclass
class RoundStatus:
    """One round: its node jobs by state, its aggregation, and its held-out accuracy."""

    index: int
    nodes: Counter[str] = field(default_factory=Counter)
    missing: int = 0
    retries: int = 0
    aggregate: str = "waiting"
    accuracy: float | None = None
    image_accuracy: float | None = None  # whole held-out images (rounds before it: None)
    bytes_per_job: int | None = None  # network bytes per node job besides its data
    submit_host_bytes: int | None = None  # through the submit host (HTCondor file transfer)
    residual_misses: int | None = None  # compressed jobs that started without their residual
    model_delta_misses: int | None = None  # jobs that fetched a published model whole


@dataclass
class RunStatus:
    """A run as its files describe it; `state` is not started, running, done, failed or
    STOPPED."""

    run_dir: Path
    name: str
    nodes_per_round: int
    state: str
    rounds: list[RoundStatus]
    report_status: str | None = None
    updated: int | None = None  # the status file's Timestamp
    lanes: str | None = None  # an asynchronous run: rows are lanes, and this is its progress

    @property
    def ended(self) -> bool:
        return self.state in ("done", "failed", STOPPED)

    @property
    def accuracy(self) -> list[float]:
        return [r.accuracy for r in self.rounds if r.accuracy is not None]

    @property
    def retries(self) -> int:
        return sum(r.retries for r in self.rounds)

    @property
    def current_round(self) -> int:
        """The first round not yet aggregated (the last one when all are)."""
        for r in self.rounds:
            if r.aggregate != "done":
                return r.index
        return len(self.rounds) - 1


def read_status_file(path: Path) -> tuple[dict[str, classad2.ClassAd], classad2.ClassAd | None]:
    """The NodeStatus ads by node name, and the DagStatus ad (None without a file)."""
    if not path.is_file():
        return {}, None
    try:
        ads = list(classad2.parseAds(path.read_text()))
    except (OSError, ValueError, classad2.ClassAdException) as exc:
        raise UserError(f"{path}: not a DAGMan node status file ({exc})") from None
    nodes = {str(ad["Node"]): ad for ad in ads if ad.get("Type") == "NodeStatus"}
    head = next((ad for ad in ads if ad.get("Type") == "DagStatus"), None)
    return nodes, head


@dataclass(frozen=True)
class JobHistory:
    """What a node's user log says: its latest job's state and how often it was submitted.

    Submissions count every try of every submission of the DAG, so retries survive a rescue
    resume (the status file's RetryCount starts again at 0 with each DAGMan).
    """

    state: str | None = None
    submissions: int = 0

    @property
    def retries(self) -> int:
        return max(self.submissions - 1, 0)


def job_history(log: Path) -> JobHistory:
    """Read a user log once (no log: no job yet)."""
    if not log.is_file():
        return JobHistory()
    state, submissions = None, 0
    events = htcondor2.JobEventLog(str(log))
    try:
        for event in events.events(stop_after=0):
            state = _JOB_EVENTS.get(event.type, state)
            submissions += event.type == htcondor2.JobEventType.SUBMIT
    finally:
        events.close()
    return JobHistory(state, submissions)


def node_state(status: int | None, job: str | None) -> str:
    """One of NODE_STATES, from the status file's code and the job log's latest event.

    The log wins only while its job is active: a finished job's node is whatever DAGMan (POST
    script, retries) made of it, and logs of an earlier submission must not count again.
    A futile node (one that will not run because a parent failed) counts as waiting.
    """
    if status == DONE:
        return "done"
    if status == ERROR:
        return "failed"
    if job in _ACTIVE:
        return job
    if status in (PRERUN, SUBMITTED, POSTRUN):
        return "running" if job == "ended" or status != SUBMITTED else "idle"
    return "waiting"


def _dag_state(head: classad2.ClassAd | None, rounds: list[RoundStatus]) -> str:
    if head is not None:
        code = head.get("DagStatus")
        return {DONE: "done", ERROR: "failed"}.get(code, "running")
    active = any(r.nodes[s] for r in rounds for s in _ACTIVE) or any(
        r.aggregate in _ACTIVE for r in rounds
    )
    return "running" if active else "not started"


def _round(run_dir: Path, index: int, nodes: int, ads: dict[str, classad2.ClassAd]) -> RoundStatus:
    status = RoundStatus(index)
    for n in range(nodes):
        _count_job(status, ads.get(node_name(index, n)), node_dir(run_dir, index, n))
        status.missing += (node_dir(run_dir, index, n) / MISSING_MARK).is_file()
    ad = ads.get(aggregate_name(index))
    status.aggregate = node_state(
        ad.get("NodeStatus") if ad is not None else None,
        job_history(round_dir(run_dir, index) / "aggregate.log").state,
    )
    metrics = round_metrics_path(run_dir, index)
    if metrics.is_file():
        scores = json.loads(metrics.read_text())
        status.accuracy, status.image_accuracy = scores["accuracy"], scores.get("image_accuracy")
        status.bytes_per_job = scores.get("bytes_per_job")
        status.submit_host_bytes = scores.get("submit_host_bytes")
        status.residual_misses = scores.get("residual_misses")
        status.model_delta_misses = scores.get("model_delta_misses")
    return status


def _lane(run_dir: Path, lane: int, jobs: int, ads: dict[str, classad2.ClassAd]) -> RoundStatus:
    """One lane as a row: its jobs by state (a job skipped past the budget counts as done)."""
    status = RoundStatus(lane, aggregate="-")
    for step in range(jobs):
        _count_job(status, ads.get(lane_job_name(lane, step)), lane_job_dir(run_dir, lane, step))
    return status


def _count_job(status: RoundStatus, ad: classad2.ClassAd | None, job_dir: Path) -> None:
    """Add one node job to its row: its state (DAGMan's view, else its job log) and retries."""
    history = job_history(job_dir / "job.log")
    status.nodes[node_state(ad.get("NodeStatus") if ad is not None else None, history.state)] += 1
    status.retries += history.retries


def _lane_progress(run_dir: Path, config: RunConfig) -> str:
    """Updates applied against the budget and the model version, from the run's ledger."""
    try:
        ledger = json.loads((run_dir / ASYNC_STATE).read_text())
    except (OSError, ValueError):
        return "no ledger yet"
    return f"{ledger['accepted']}/{config.update_budget} updates, version {ledger['version']}"


def _stopped(run_dir: Path) -> bool:
    """A local run stopped before its DAG ended (Ctrl-C, SIGTERM, a killed runner): the local
    runner keeps its journal exactly then, and no live process holds the run's lock. Its status
    file still says failed (or running, when the runner was killed)."""
    return journal_path(run_dir / DAG_FILE).is_file() and recorded_holder(run_dir) is None


def _resubmitted(run_dir: Path) -> bool:
    """The DAG was submitted again since DAGMan last wrote the status file: until the new DAGMan
    writes it (within seconds), its DagStatus is the one the previous DAGMan ended with."""
    status, submitted = run_dir / STATUS_FILE, run_dir / f"{DAG_FILE}.condor.sub"
    try:
        return status.stat().st_mtime_ns < submitted.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def _settle(rounds: list[RoundStatus]) -> None:
    """Nothing runs in a stopped run: jobs its files show as active wait for the resume."""
    for r in rounds:
        r.nodes["waiting"] += sum(r.nodes.pop(state, 0) for state in _ACTIVE)
        if r.aggregate in _ACTIVE:
            r.aggregate = "waiting"


def read_status(run_dir: Path) -> RunStatus:
    """The run's status now; works on a run directory or on a copy of its small files."""
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{run_dir}: not a run directory (no {CONFIG_FILE}); plan one first")
    config = read_run_config(run_dir / CONFIG_FILE)
    run = config.run
    ads, head = read_status_file(run_dir / STATUS_FILE)
    if _resubmitted(run_dir):
        head = None  # the previous DAGMan's last word (failed, removed): not this one's
    lanes = None
    if config.is_async:
        per_row = lane_length(config)
        rounds = [_lane(run_dir, lane, per_row, ads) for lane in range(run.nodes)]
        lanes = _lane_progress(run_dir, config)
    else:
        per_row = run.nodes
        rounds = [_round(run_dir, r, per_row, ads) for r in range(run.rounds)]
    stopped = _stopped(run_dir)
    if stopped:
        _settle(rounds)
    report = run_dir / REPORT_FILE
    return RunStatus(
        run_dir=run_dir,
        name=run.name,
        nodes_per_round=per_row,
        state=STOPPED if stopped else _dag_state(head, rounds),
        rounds=rounds,
        report_status=json.loads(report.read_text())["status"] if report.is_file() else None,
        updated=int(head["Timestamp"]) if head is not None and "Timestamp" in head else None,
        lanes=lanes,
    )


# Column labels short enough for an 80-column terminal.
_SHORT = {"waiting": "wait", "idle": "idle", "running": "run", "held": "held", "done": "done",
          "failed": "fail"}  # fmt: skip


def render(status: RunStatus) -> Group:
    """One table row per round that has started, under a line about the whole run."""
    table = Table(title=f"dagtrain run {status.name!r}", expand=False, box=box.SIMPLE_HEAD)
    row = "lane" if status.lanes is not None else "round"
    for column in (row, *map(_SHORT.get, NODE_STATES), "miss", "retry", "agg", "acc."):
        table.add_column(column, justify="right", min_width=len(column), no_wrap=True)
    shown = [r for r in status.rounds if r.nodes["waiting"] < status.nodes_per_round]
    if status.lanes is not None:
        shown = status.rounds
    for r in shown or status.rounds[:1]:
        accuracy = f"{r.accuracy:.3f}" if r.accuracy is not None else "-"
        counts = [str(r.nodes[s]) for s in NODE_STATES]
        tag = lane_tag(r.index) if status.lanes is not None else round_tag(r.index)
        table.add_row(tag, *counts, str(r.missing), str(r.retries), r.aggregate, accuracy)
    if status.lanes is not None:
        summary = f"{status.state}: {status.lanes}, {status.retries} retries"
    else:
        summary = (
            f"{status.state}: round {status.current_round + 1}/{len(status.rounds)}, "
            f"{status.retries} retries, held-out accuracy "
            f"{' '.join(f'{a:.3f}' for a in status.accuracy) or '-'}"
        )
        images = [r.image_accuracy for r in status.rounds if r.image_accuracy is not None]
        if images:
            summary += f" (whole images {images[-1]:.3f})"
        summary += _transfer(status.rounds)
    if status.report_status is not None:
        summary += f"; report: {status.report_status}"
    return Group(Text(summary), table)


def _transfer(rounds: list[RoundStatus]) -> str:
    """The last round's network bytes per node job besides data, the submit host's mean bytes
    per round so far, and the jobs that started without their residual or fetched the model
    whole although its delta was published, if any."""
    done = [r for r in rounds if r.submit_host_bytes is not None and r.bytes_per_job is not None]
    if not done:
        return ""
    host = sum(r.submit_host_bytes for r in done) / len(done) / 1e6
    text = f"; {done[-1].bytes_per_job / 1e3:.0f} kB per job, submit host {host:.2f} MB/round"
    for name, misses in (
        ("residual", sum(r.residual_misses or 0 for r in done)),
        ("model delta", sum(r.model_delta_misses or 0 for r in done)),
    ):
        text += f", {misses} {name} misses" if misses else ""
    return text


def to_json(status: RunStatus) -> dict[str, Any]:
    """The table's facts for programs (`dagtrain status --json`): every row, started or not.

    Rows are rounds (`round`, numbered as rounds/rNNN from 0) or, in an asynchronous run, lanes
    (`lane`); each has its node jobs by state, missing nodes, retries, the aggregation's state,
    the held-out accuracy of the model it made and the bytes its jobs moved (network bytes per
    job besides data, the submit host's total, jobs that started without their residual or
    fetched the model whole although its delta was published)."""
    row = "lane" if status.lanes is not None else "round"
    return {
        "run_dir": str(status.run_dir),
        "name": status.name,
        "mode": "async" if status.lanes is not None else "sync",
        "state": status.state,
        "ended": status.ended,
        "current_round": status.current_round if status.lanes is None else None,
        "rounds": len(status.rounds) if status.lanes is None else None,
        "progress": status.lanes,
        "retries": status.retries,
        "accuracy": status.accuracy,
        "report": status.report_status,
        "updated": status.updated,
        "nodes_per_row": status.nodes_per_round,
        "rows": [
            {
                row: r.index,
                **{state: r.nodes[state] for state in NODE_STATES},
                "missing": r.missing,
                "retries": r.retries,
                "aggregate": r.aggregate if status.lanes is None else None,
                "accuracy": r.accuracy,
                "image_accuracy": r.image_accuracy,
                "bytes_per_job": r.bytes_per_job,
                "submit_host_bytes": r.submit_host_bytes,
                "residual_misses": r.residual_misses,
                "model_delta_misses": r.model_delta_misses,
            }
            for r in status.rounds
        ],
    }


def show_json(read: Callable[[], RunStatus], watch: bool, interval_s: float = 2.0) -> RunStatus:
    """The status as one line of JSON; with `watch`, a line each time it changes until the DAG
    ends (JSON Lines)."""
    status, shown = read(), None
    while True:
        text = json.dumps(to_json(status))
        if text != shown:
            print(text, flush=True)
            shown = text
        if not watch or status.ended:
            return status
        time.sleep(interval_s)
        status = read()


def show(
    read: Callable[[], RunStatus], console: Console, watch: bool, interval_s: float = 2.0
) -> RunStatus:
    """Print the status once, or refresh it until the DAG ends (`read` may fetch remote files)."""
    status = read()
    if not watch or status.ended:
        console.print(render(status))
        return status
    with Live(render(status), console=console, refresh_per_second=4) as live:
        while not status.ended:
            time.sleep(interval_s)
            status = read()
            live.update(render(status))
    return status
