"""The FINAL node: gathers every finished round's metrics into report.json, accuracy.png and
confusion.png."""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from aggregation.async_apply import flush
from aggregation.async_report import async_report
from aggregation.evictions import node_evictions, run_evictions, with_evictions
from aggregation.heldout_metrics import final_metrics
from aggregation.node_metrics import figure, read_node_metrics
from aggregation.report_plots import plot_accuracy, plot_confusion
from aggregation.utilization import node_usage
from node_payload.common.atomic_file import write_text
from node_payload.common.job_bytes import JobBytes
from node_payload.common.run_config import RunConfig, read_run_config
from node_payload.common.run_layout import (
    CONFUSION_PLOT_FILE,
    METRICS_FILE,
    PLOT_FILE,
    REPORT_FILE,
    node_dir,
    round_metrics_path,
)
from node_payload.common.threads import job_threads


def collect(run_dir: Path, rounds: int) -> list[dict[str, Any]]:
    """Round metrics in order, stopping at the first round that did not finish."""
    finished = []
    for r in range(rounds):
        path = round_metrics_path(run_dir, r)
        if not path.is_file():
            break
        finished.append(json.loads(path.read_text()))
    return finished


def busy_seconds(run_dir: Path, rounds: int, nodes: int) -> dict[int, float]:
    """Per node, the seconds its jobs took (slowed, as the run saw them) over the first
    `rounds` rounds; a node whose job never finished counts nothing for that round."""
    busy = dict.fromkeys(range(nodes), 0.0)
    for r in range(rounds):
        for n in busy:
            path = node_dir(run_dir, r, n) / METRICS_FILE
            metrics = read_node_metrics(path, f"round {r} node {n}") if path.is_file() else None
            busy[n] += figure(metrics, "seconds") if metrics is not None else 0.0
    return busy


def wall_seconds(rounds: list[dict[str, Any]]) -> float | None:
    """From the first node start to the last aggregation's end; None when a round (written
    before rounds recorded started_at) cannot say when it began."""
    if not rounds or any("started_at" not in r for r in rounds):
        return None
    return max(r["started_at"] + r["seconds"] for r in rounds) - min(
        r["started_at"] for r in rounds
    )


def build_report(
    config: RunConfig,
    rounds: list[dict[str, Any]],
    dag_status: int,
    busy: dict[int, float] | None = None,
) -> dict:
    """The run's report; `busy` (node -> seconds, see busy_seconds) adds node utilization."""
    planned = config.run.rounds
    complete = dag_status == 0 and len(rounds) == planned
    rounds = [_with_counts(r) for r in rounds]
    return {
        "run": config.run.name,
        "status": "completed" if complete else "failed",
        "dag_status": dag_status,
        "rounds_planned": planned,
        "rounds_completed": len(rounds),
        "summary": f"{len(rounds)}/{planned} rounds",
        "nodes": config.run.nodes,
        **final_metrics(rounds[-1] if rounds else None),
        "seconds": sum(r["seconds"] for r in rounds),
        "bytes_downloaded": sum(r["bytes_downloaded"] for r in rounds),
        # What the nodes sent back: the figure update compression ([compression]) shrinks.
        "update_bytes": sum(r.get("update_bytes", 0) for r in rounds),
        **_run_bytes(rounds),
        # Reads moved off a faulty mirror: high counts name a mirror to fix (see node metrics).
        "mirror_failovers": sum(r["mirror_failovers"] for r in rounds),
        # Nodes whose updates were refused or scaled down: a node listed again and again is a
        # machine to look at (its reasons are in the rounds' nodes_rejected and nodes_clipped).
        "updates_rejected": sum(r["updates_rejected"] for r in rounds),
        "updates_clipped": sum(r["updates_clipped"] for r in rounds),
        "nodes_ever_rejected": _nodes_listed(rounds, "nodes_rejected"),
        "nodes_ever_clipped": _nodes_listed(rounds, "nodes_clipped"),
        **run_evictions(rounds),
        **with_evictions(node_usage(busy or {}, wall_seconds(rounds)), node_evictions(rounds)),
        "rounds": rounds,
    }


def _run_bytes(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds' byte records summed (aggregation/round_bytes.py), the submit host's mean per
    round, the mean network bytes per job besides data, and the jobs that started without their
    lane's residual or fetched their model whole instead of by delta; nothing for rounds
    written before jobs recorded their bytes."""
    counted = [r for r in rounds if r.get("jobs_counted")]
    if not counted:
        return {}
    total = JobBytes()
    for r in counted:
        total += JobBytes.from_json(r["bytes"]) or JobBytes()
    jobs = sum(r["jobs_counted"] for r in counted)
    return {
        "bytes": total.to_json(),
        "submit_host_bytes_per_round": round(total.through_submit_host.total / len(counted)),
        "bytes_per_job": round(total.network_without_data / jobs),
        "residual_misses": sum(r["residual_misses"] for r in counted),
        "model_delta_misses": sum(r.get("model_delta_misses", 0) for r in counted),
    }


def _with_counts(round_: dict[str, Any]) -> dict[str, Any]:
    """Round metrics plus how many updates were rejected and clipped (older rounds: no clips)."""
    return {
        **round_,
        "updates_rejected": len(round_["nodes_rejected"]),
        "updates_clipped": len(round_.get("nodes_clipped", {})),
    }


def _nodes_listed(rounds: list[dict[str, Any]], key: str) -> list[int]:
    return sorted({int(node) for r in rounds for node in r.get(key, {})})


def write_report(run_dir: Path, config: RunConfig, dag_status: int) -> dict:
    if config.is_async:
        flush(run_dir, config)  # the buffer's last arrivals, fewer than `buffer`
        report = async_report(run_dir, config, dag_status)
    else:
        rounds = collect(run_dir, config.run.rounds)
        busy = busy_seconds(run_dir, len(rounds), config.run.nodes)
        report = build_report(config, rounds, dag_status, busy)
    write_text(run_dir / REPORT_FILE, json.dumps(report, indent=1) + "\n")
    if report.get("rounds") or report.get("evaluations"):
        plot_accuracy(report, run_dir / PLOT_FILE)
    if report.get("final_confusion") is not None:
        plot_confusion(report, run_dir / CONFUSION_PLOT_FILE)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dagtrain-report")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--dag-status", type=int, default=0)
    args = parser.parse_args(argv)
    run_dir = args.config.resolve().parent
    torch.set_num_threads(job_threads())  # its evaluations on the cores the job asked for
    report = write_report(run_dir, read_run_config(args.config), args.dag_status)
    print(
        f"dagtrain report: {report['status']}, {report['summary']}, final accuracy "
        f"{report['final_accuracy']} (images {report['final_image_accuracy']}), "
        f"{report['mirror_failovers']} mirror failovers"
    )
    # A FINAL node's own result becomes the DAG's: fail it after a failed DAG, so DAGMan keeps
    # the failure visible and writes the rescue DAG that resumes the run.
    return 0 if args.dag_status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
