"""DAGMan's NODE_STATUS_FILE (one DagStatus ad, one NodeStatus ad per node, a StatusEnd ad),
written atomically so a monitor never reads half a file, and identical in shape to a pool's."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import classad2

from node_payload.common.atomic_file import write_text

# NodeStatus values from the DAGMan manual ("Capturing the Status of Nodes in a File").
NOT_READY, READY, PRERUN, SUBMITTED, POSTRUN, DONE, ERROR, FUTILE = range(8)
_COUNTS = {
    NOT_READY: "NodesUnready", READY: "NodesReady", PRERUN: "NodesPre",
    SUBMITTED: "NodesQueued", POSTRUN: "NodesPost", DONE: "NodesDone", ERROR: "NodesFailed",
    FUTILE: "NodesFutile",
}  # fmt: skip


@dataclass(frozen=True)
class NodeState:
    name: str
    status: int
    details: str = ""
    retry_count: int = 0
    job_queued: bool = False


def render(dag_file: Path, dag_status: int, nodes: list[NodeState], next_update: float) -> str:
    """The file's text; DagStatus uses the same codes as NodeStatus, as DAGMan does."""
    now = int(time.time())
    head = classad2.ClassAd()
    head["Type"] = "DagStatus"
    head["DagFiles"] = [dag_file.name]
    head["Timestamp"] = now
    head["DagStatus"] = dag_status
    head["NodesTotal"] = len(nodes)
    for status, name in _COUNTS.items():
        head[name] = sum(1 for node in nodes if node.status == status)
    head["JobProcsHeld"] = 0
    head["JobProcsIdle"] = 0
    ads = [head]
    for node in nodes:
        ad = classad2.ClassAd()
        ad["Type"] = "NodeStatus"
        ad["Node"] = node.name
        ad["NodeStatus"] = node.status
        ad["StatusDetails"] = node.details
        ad["RetryCount"] = node.retry_count
        ad["JobProcsQueued"] = int(node.job_queued)
        ad["JobProcsHeld"] = 0
        ads.append(ad)
    end = classad2.ClassAd()
    end["Type"] = "StatusEnd"
    end["EndTime"] = now
    end["NextUpdate"] = int(next_update)
    ads.append(end)
    return "\n".join(str(ad) for ad in ads) + "\n"


def write(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)
