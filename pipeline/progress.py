"""Progress of a DAG run: rounds, node states and the latest held-out accuracy (or, for an
asynchronous run, updates applied and model versions from its ledger).

On a terminal it is one live table. Anywhere else (a log file, a batch job, CI) a live table shows
nothing until the run ends, so there it is one plain line per finished round or model version."""

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
    """Consumes the local runner's node events: a live table on a terminal, else plain lines."""

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
        self.console = console
        # A resumed asynchronous run has made versions already: lines only for new ones.
        self.versions_shown = self._ledger()["version"] if update_budget is not None else 0
        self.live = (
            Live(self._table(), console=console, refresh_per_second=4, transient=False)
            if console.is_terminal
            else None
        )

    def __enter__(self) -> "RunProgress":
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.__exit__(*exc)

    def on_event(self, event: object) -> None:
        node, kind = getattr(event, "node", ""), getattr(event, "kind", "")
        if kind == "retry":
            self.retries += 1
        self.state[node] = kind
        match = _NODE.match(node)
        if match and match.group(1) == "aggregate" and kind == "done":
            round_ = int(match.group(2))
            metrics = round_metrics_path(self.run_dir, round_)
            if metrics.is_file():
                scores = json.loads(metrics.read_text())
                self.accuracy.append(scores["accuracy"])
                if self.live is None:
                    self._line(self._round_line(round_, scores))
        if self.live is not None:
            self.live.update(self._table())
        elif self.update_budget is not None:
            self._version_lines()

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _round_line(self, round_: int, scores: dict) -> str:
        """From round.json; a figure it lacks (written by an older dagtrain) is left out."""
        parts = [f"round {round_ + 1}/{self.rounds} done"]
        if "nodes_used" in scores:
            parts.append(f"{scores['nodes_used']}/{self.nodes} nodes")
        accuracy = f"held-out accuracy {scores['accuracy']:.3f}"
        if scores.get("image_accuracy") is not None:
            accuracy += f" (whole images {scores['image_accuracy']:.3f})"
        parts.append(accuracy)
        if "loss" in scores:
            parts.append(f"loss {scores['loss']:.3f}")
        if "seconds" in scores:
            parts.append(f"{scores['seconds']:.0f} s")
        return ", ".join(parts) + f", {self.retries} retries"

    def _version_lines(self) -> None:
        """One line for each model version made since the last line."""
        ledger = self._ledger()
        counts = self._job_counts()
        for version in range(self.versions_shown + 1, ledger["version"] + 1):
            self._line(
                f"version {version}: {ledger['accepted']}/{self.update_budget} updates applied, "
                f"{counts['running'] + counts['submitted']} jobs running, "
                f"{counts['failed'] + counts['removed']} failed, {self.retries} retries"
            )
        self.versions_shown = max(self.versions_shown, ledger["version"])

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

    def _job_counts(self) -> Counter[str]:
        return Counter(self.state[n] for n in self.state if n.startswith("train_"))

    def _ledger(self) -> dict:
        try:
            return json.loads((self.run_dir / ASYNC_STATE).read_text())
        except (OSError, ValueError):
            return {"accepted": 0, "version": 0}

    def _async_table(self) -> Table:
        counts, ledger = self._job_counts(), self._ledger()
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
