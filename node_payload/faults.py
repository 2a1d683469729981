"""Fault injection for tests and demonstrations: `[faults]` makes chosen node jobs misbehave.

`fail` pairs exit as if the data were unreachable on every attempt (so DAGMan retries and then
the node counts as missing); `hang` pairs sleep past the round deadline (so the job is removed).
"""

import time
from typing import Any

from node_payload.fetch import DataUnreachable


def inject(config: dict[str, Any], round_: int, node: int) -> None:
    faults = config.get("faults", {})
    if [round_, node] in faults.get("fail", []):
        raise DataUnreachable(f"injected failure ([faults] fail) for round {round_} node {node}")
    if [round_, node] in faults.get("hang", []):
        time.sleep(2 * config["run"]["node_deadline_s"] + 60)
