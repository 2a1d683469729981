"""A node job's metrics.json, as the aggregation and the reports read it.

The file comes back from a volunteer's machine, so it may hold anything. One that is not a JSON
object is left out with one line naming the job; a figure that is not a finite, non-negative
number counts as 0; a fragment id that is not a non-negative integer is dropped. A lying node
can skew its own figures, never stop a round or a report.
"""

import json
import math
from pathlib import Path
from typing import Any


def read_node_metrics(path: Path, job: str) -> dict[str, Any] | None:
    """The job's metrics, or None (said in one line) when the file holds no JSON object."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):  # a UnicodeDecodeError is a ValueError
        metrics = None
    if not isinstance(metrics, dict):
        print(f"{job}: its {path.name} is not a JSON object; left out", flush=True)
        return None
    return metrics


def figure(metrics: dict[str, Any], key: str) -> float:
    """metrics[key] when it is a finite, non-negative number (an int stays an int); 0 otherwise."""
    value = metrics.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else 0
    if isinstance(value, float) and math.isfinite(value) and value >= 0:
        return value
    return 0


def fragment_ids(metrics: dict[str, Any]) -> list[int]:
    """The training fragment ids the job lists, non-negative integers only."""
    ids = metrics.get("train_fragments")
    if not isinstance(ids, list):
        return []
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0]
