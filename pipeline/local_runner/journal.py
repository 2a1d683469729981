"""Which nodes already finished: our own journal (DAGMan's "recovery mode", for a runner that
was killed) and DAGMan rescue DAGs (for a DAG that failed), read together.

Both are honoured and combined: a node counts as done if the newest rescue DAG or the journal
says so. Neither can contradict the other (each only ever records successes), so no precedence
is needed. The journal is removed when a run ends (its content then lives in the rescue DAG,
or the DAG completed), so a completed DAG submitted again runs again, as with DAGMan.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from node_payload.common.errors import UserError


def journal_path(dag_file: Path) -> Path:
    return dag_file.parent / ".local_runner" / f"{dag_file.name}.journal"


def read_journal(path: Path) -> set[str]:
    """A line is only trusted once complete: a crash mid-write leaves an unterminated tail."""
    if not path.exists():
        return set()
    text = path.read_text()
    lines = text.split("\n")[:-1]  # the last element is "" or an incomplete line
    return {line[5:] for line in lines if line.startswith("DONE ")}


class Journal:
    """Append-only record of node successes, fsynced so a SIGKILL loses at most the current one."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def done(self, node: str) -> None:
        os.write(self._fd, f"DONE {node}\n".encode())
        os.fsync(self._fd)

    def close(self, remove: bool) -> None:
        os.close(self._fd)
        if remove:
            self.path.unlink(missing_ok=True)


def rescue_files(dag_file: Path) -> list[Path]:
    """Existing `<dag>.rescueNNN` files, oldest first."""
    pattern = re.compile(re.escape(dag_file.name) + r"\.rescue(\d{3})$")
    found = [(int(m.group(1)), p) for p in dag_file.parent.iterdir()
             if (m := pattern.match(p.name))]  # fmt: skip
    return [p for _, p in sorted(found)]


def read_rescue(path: Path) -> set[str]:
    """DONE lines of a partial rescue DAG (DAGMan's default format); RETRY lines are ignored."""
    done: set[str] = set()
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "DONE" and len(words) == 2:
            done.add(words[1])
        elif words[0].upper() != "RETRY":
            raise UserError(f"{path}:{number}: unexpected line in rescue DAG: {raw.strip()!r}")
    return done


def write_rescue(dag_file: Path, done: list[str], failed: list[str], total: int) -> Path:
    """The next `<dag>.rescueNNN`: comments, then one DONE line per finished node."""
    existing = rescue_files(dag_file)
    number = int(existing[-1].name[-3:]) + 1 if existing else 1
    path = dag_file.with_name(f"{dag_file.name}.rescue{number:03d}")
    lines = [
        f"# Rescue DAG file, created by the dagtrain local runner for {dag_file.name}",
        f"# Total number of Nodes: {total}",
        f"# Nodes premarked DONE: {len(done)}",
        f"# Nodes that failed: {len(failed)}",
        *(f"#   {name}" for name in failed),
        "",
        *(f"DONE {name}" for name in done),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
