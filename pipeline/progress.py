"""Live progress of a DAG run: rounds, node states and the latest held-out accuracy (or, for an
asynchronous run, updates applied and model versions from its ledger)."""

import json
import re
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from node_payload.common.run_layout import ASYNC_STATE, round_metrics_path

_NODE = re.compile(r"^(train|aggregate)_r(\d+)")


class RunProgress:
    """Consumes the local runner's node events and renders one live table."""

    def __init__(
        self,
        run_dir: Path,
        rounds: int,
        nodes: int,
        console: Console,
        update_budget: int | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.rounds = rounds
        self.nodes = nodes
        self.update_budget = update_budget  # set for an asynchronous run
        self.state: dict[str, str] = {}
        self.retries = 0
        self.accuracy: list[float] = []
        self.live = Live(self._table(), console=console, refresh_per_second=4, transient=False)

    def __enter__(self) -> "RunProgress":
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.update(self._table())
        self.live.__exit__(*exc)
        if not self.live.console.is_terminal:  # rich ends the last frame only on a terminal
            self.live.console.line()

    def on_event(self, event: object) -> None:
        node, kind = getattr(event, "node", ""), getattr(event, "kind", "")
        if kind == "retry":
            self.retries += 1
        self.state[node] = kind
        match = _NODE.match(node)
        if match and match.group(1) == "aggregate" and kind == "done":
            metrics = round_metrics_path(self.run_dir, int(match.group(2)))
            if metrics.is_file():
                self.accuracy.append(json.loads(metrics.read_text())["accuracy"])
        self.live.update(self._table())

    def _current_round(self) -> int:
        rounds = [int(m.group(2)) for n in self.state if (m := _NODE.match(n))]
        return max(rounds, default=0)

    def _table(self) -> Table:
        if self.update_budget is not None:
            return self._async_table()
        current = self._current_round()
        counts = Counter(
            kind
            for node, kind in self.state.items()
            if (m := _NODE.match(node)) and m.group(1) == "train" and int(m.group(2)) == current
        )
        table = Table(title="dagtrain run", expand=False)
        for column in ("round", "nodes done", "running", "failed", "retries", "accuracy"):
            table.add_column(column, justify="right")
        table.add_row(
            f"{current + 1}/{self.rounds}",
            f"{counts['done']}/{self.nodes}",
            str(counts["running"] + counts["submitted"]),
            str(counts["failed"] + counts["removed"]),
            str(self.retries),
            " ".join(f"{a:.3f}" for a in self.accuracy[-6:]) or "-",
        )
        return table

    def _async_table(self) -> Table:
        counts = Counter(self.state[n] for n in self.state if n.startswith("train_"))
        try:
            ledger = json.loads((self.run_dir / ASYNC_STATE).read_text())
        except (OSError, ValueError):
            ledger = {"accepted": 0, "version": 0}
        table = Table(title="dagtrain run (asynchronous)", expand=False)
        for column in ("updates", "versions", "running", "failed", "retries"):
            table.add_column(column, justify="right")
        table.add_row(
            f"{ledger['accepted']}/{self.update_budget}",
            str(ledger["version"]),
            str(counts["running"] + counts["submitted"]),
            str(counts["failed"] + counts["removed"]),
            str(self.retries),
        )
        return table
