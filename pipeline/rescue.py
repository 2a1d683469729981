"""Giving missing nodes another chance when a stopped run is resumed.

A node that failed all its tries or passed the deadline is marked MISSING by its POST script,
which returns 0 so the round can go on at quorum. DAGMan therefore records it as DONE, and a
rescue DAG alone would rerun only the failed aggregation, which would find the same gap. So on
resume, for every round not yet aggregated, the MISSING nodes lose their DONE line in the newest
rescue DAG (and their mark), and DAGMan or the local runner runs them again.
"""

import re
from pathlib import Path

from node_payload.common.atomic_file import write_text
from node_payload.common.run_config import read_run_config
from node_payload.common.run_layout import (
    CONFIG_FILE,
    DAG_FILE,
    MISSING_MARK,
    node_dir,
    node_name,
    round_metrics_path,
)

_RESCUE = re.compile(re.escape(DAG_FILE) + r"\.rescue(\d{3})$")


def newest_rescue(run_dir: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _RESCUE.match(p.name))]
    return max(found)[1] if found else None


def reopen_missing_nodes(run_dir: Path) -> list[str]:
    """Returns the node names that will run again."""
    rescue = newest_rescue(run_dir)
    if rescue is None:
        return []
    run = read_run_config(run_dir / CONFIG_FILE).run
    reopen = {}
    for r in range(run.rounds):
        if round_metrics_path(run_dir, r).is_file():
            continue
        for n in range(run.nodes):
            mark = node_dir(run_dir, r, n) / MISSING_MARK
            if mark.is_file():
                reopen[node_name(r, n)] = mark
    if not reopen:
        return []
    lines = rescue.read_text().splitlines(keepends=True)
    kept = [
        line
        for line in lines
        if not (
            len(words := line.split()) == 2 and words[0].upper() == "DONE" and words[1] in reopen
        )
    ]
    write_text(rescue, "".join(kept))
    for mark in reopen.values():
        mark.unlink()
    return sorted(reopen)
