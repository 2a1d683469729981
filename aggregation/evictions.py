"""How much a round's node jobs lost to evictions, and how much their checkpoints saved.

An eviction is in the job's user log (`job.log`, event 004, written by the pool's shadow or the
local runner); the checkpoints are in the job's metrics (`checkpoints`: when each was written and
the training seconds behind it, carried from restart to restart). Per eviction, the work lost is
the time from the later of the job's start on that machine and its last checkpoint there to the
eviction; the work saved is the training behind the last checkpoint written before it, which the
restarted job did not do again. Standard library only: it reads text files.
"""

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_payload.common.run_layout import METRICS_FILE, lane_dir, node_dir

JOB_LOG = "job.log"  # the node submit file's `log`
_EVENT = re.compile(r"^(\d{3}) \(\d+\.\d+\.\d+\) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ", re.MULTILINE)
EXECUTE, EVICTED = "001", "004"


@dataclass(frozen=True)
class Evictions:
    count: int = 0
    seconds_lost: float = 0.0
    seconds_saved: float = 0.0

    def __add__(self, other: "Evictions") -> "Evictions":
        return Evictions(
            self.count + other.count,
            self.seconds_lost + other.seconds_lost,
            self.seconds_saved + other.seconds_saved,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "evictions": self.count,
            "eviction_seconds_lost": round(self.seconds_lost, 3),
            "eviction_seconds_saved": round(self.seconds_saved, 3),
        }


def _events(job_log: Path) -> list[tuple[str, float]]:
    """(event code, epoch seconds) in log order; the log's stamps are the access point's local
    time, as HTCondor writes them."""
    if not job_log.is_file():
        return []
    text = job_log.read_text(errors="replace")
    return [
        (code, time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")))
        for code, stamp in _EVENT.findall(text)
    ]


def _checkpoints(metrics_file: Path) -> list[dict[str, float]]:
    """The checkpoints the finished job's chain of restarts wrote ([] without any)."""
    try:
        history = json.loads(metrics_file.read_text()).get("checkpoints") or {}
        written = history.get("written", [])
        return [w for w in written if isinstance(w, dict) and {"at", "seconds"} <= w.keys()]
    except (OSError, ValueError, AttributeError):
        return []


def job_evictions(job_dir: Path) -> Evictions:
    """The evictions of one node's jobs (every DAGMan attempt shares its log)."""
    checkpoints = _checkpoints(job_dir / METRICS_FILE)
    total = Evictions()
    started = None
    for code, at in _events(job_dir / JOB_LOG):
        if code == EXECUTE:
            started = at
        elif code == EVICTED and started is not None:
            before = [c for c in checkpoints if c["at"] <= at]
            here = [c["at"] for c in before if c["at"] >= started]
            lost = at - max([started, *here])
            saved = max((c["seconds"] for c in before), default=0.0)
            total = total + Evictions(1, max(lost, 0.0), saved)
            started = None
    return total


def round_evictions(run_dir: Path, round_: int, nodes: int) -> dict[str, Any]:
    """A round's figures for round.json: totals, and each evicted node's own."""
    per_node = {n: job_evictions(node_dir(run_dir, round_, n)) for n in range(nodes)}
    total = sum(per_node.values(), Evictions())
    return {
        **total.to_json(),
        "evictions_per_node": {str(n): e.to_json() for n, e in per_node.items() if e.count},
    }


def run_evictions(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's totals over its rounds (rounds written before evictions were counted: none)."""
    total = sum((_figures(r) for r in rounds), Evictions())
    return total.to_json()


def node_evictions(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per evicted node, its totals over the rounds: a node evicted again and again is a
    machine whose owner keeps coming back."""
    per_node: dict[str, Evictions] = {}
    for r in rounds:
        for node, figures in r.get("evictions_per_node", {}).items():
            per_node[node] = per_node.get(node, Evictions()) + _figures(figures)
    return {node: e.to_json() for node, e in sorted(per_node.items(), key=lambda i: int(i[0]))}


def _figures(record: dict[str, Any]) -> Evictions:
    return Evictions(
        record.get("evictions", 0),
        record.get("eviction_seconds_lost", 0.0),
        record.get("eviction_seconds_saved", 0.0),
    )


def with_evictions(usage: dict[str, Any], per_node: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report's per-node view (utilization.node_usage) with each evicted node's figures."""
    for node, figures in per_node.items():
        usage["node_usage"].setdefault(node, {}).update(figures)
    return usage


def lane_evictions(run_dir: Path, lanes: int) -> dict[str, Any]:
    """An asynchronous run's figures: every job of every lane, totals and per evicted lane."""
    per_lane = {
        lane: sum(
            (job_evictions(d) for d in sorted(lane_dir(run_dir, lane).glob("j*")) if d.is_dir()),
            Evictions(),
        )
        for lane in range(lanes)
    }
    return {
        **sum(per_lane.values(), Evictions()).to_json(),
        "evictions_per_node": {str(n): e.to_json() for n, e in per_lane.items() if e.count},
    }
