"""`dagtrain simulate`'s output: a table on the terminal, simulate.json and simulate.png."""

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[dict[str, Any]], pool_name: str) -> Table:
    first = results[0]
    title = (
        f"{first['nodes']} nodes x {first['rounds']} rounds of {first['local_steps']} steps on "
        f"{first['machines']} machines ({pool_name})"
    )
    out = Table(title=title)
    for column in (
        "variant",
        "finish",
        "round",
        "node use",
        "pool use",
        "submit GB",
        "mirror GB",
        "stale",
        "missed",
        "evicted",
    ):
        out.add_column(column, justify="left" if column == "variant" else "right")
    for r in results:
        staleness = r["staleness"]
        finish = _duration(r["seconds_to_finish"]) + ("" if r["dag_ok"] else " (failed)")
        out.add_row(
            r["variant"],
            finish,
            _duration(r["mean_round_seconds"]),
            _share(r["mean_utilization"]),
            _share(r["machine_utilization"]),
            f"{r['bytes_through_submit_host'] / 1e9:.2f}",
            f"{r['bytes_from_mirrors'] / 1e9:.2f}",
            f"{_number(staleness['mean'])}/{staleness['max'] if staleness['max'] is not None else '-'}",
            str(sum(r["nodes_missing"])),
            str(r["evictions"]),
        )
    return out


def show(results: list[dict[str, Any]], pool_name: str, console: Console) -> None:
    console.print(table(results, pool_name))


def write_json(results: list[dict[str, Any]], pool: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps({"pool": pool, "variants": results}, indent=1) + "\n")


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Round times of the synchronous variants, the asynchronous staleness, and time to finish."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rounds, stale, finish) = plt.subplots(1, 3, figsize=(14, 4))
    for r in results:
        if r["round_seconds"]:
            rounds.plot(range(len(r["round_seconds"])), r["round_seconds"], label=r["variant"])
        histogram = r["staleness"]["histogram"]
        if histogram:
            stale.bar([int(k) for k in histogram], list(histogram.values()), label=r["variant"])
    rounds.set(title="round time", xlabel="round", ylabel="seconds")
    if any(r["round_seconds"] for r in results):
        rounds.legend()
    stale.set(title="staleness of applied updates", xlabel="versions behind", ylabel="updates")
    labels = [r["variant"] for r in results]
    finish.bar(labels, [r["seconds_to_finish"] / 3600 for r in results])
    finish.set(title="time to finish the planned work", ylabel="hours")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
