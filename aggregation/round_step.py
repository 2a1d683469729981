"""One synchronous round's aggregation: offer the nodes' updates to the aggregation step, check
the quorum, step, save, evaluate.

Idempotent: a round whose next model and metrics already exist is left alone, and the next
model is written atomically after the server state, so a kill at any point loses nothing and
a rerun (DAGMan rescue, local runner resume) produces the same bytes.
"""

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from aggregation.aggregator import Aggregator, Offered
from aggregation.evictions import round_evictions
from aggregation.heldout import load_heldout, run_manifest, training_coverage
from aggregation.heldout_metrics import heldout_metrics
from aggregation.merge import MergeResult
from aggregation.node_metrics import figure, read_node_metrics
from aggregation.publish import publish_model
from aggregation.quorum import QuorumNotMet, required_updates
from aggregation.round_bytes import round_bytes
from aggregation.tensorboard_log import log_round
from node_payload.common.atomic_file import write_text
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import (
    METRICS_FILE,
    MISSING_MARK,
    UPDATE_FILE,
    model_path,
    node_dir,
    round_metrics_path,
)
from node_payload.common.threads import job_threads


def aggregate_round(run_dir: Path, config: RunConfig, round_: int) -> dict[str, Any]:
    """Returns the round's metrics; raises QuorumNotMet when too few valid updates arrived."""
    metrics_path = round_metrics_path(run_dir, round_)
    if metrics_path.is_file() and model_path(run_dir, round_ + 1).is_file():
        return json.loads(metrics_path.read_text())
    torch.set_num_threads(job_threads())
    aggregator = Aggregator(run_dir, config)
    current = aggregator.load(round_)
    present = [(n, node_dir(run_dir, round_, n) / UPDATE_FILE) for n in range(config.run.nodes)]
    # A symbolic link, even a dangling one, is something a node sent: validation rejects it.
    updates = [(n, path) for n, path in present if path.is_file() or path.is_symlink()]
    missing = [n for n, path in present if (n, path) not in updates]
    merged = aggregator.merge(current, [Offered(n, path) for n, path in updates])
    _log(run_dir, config, round_, merged, missing)
    required = required_updates(config.run.nodes, config.run.quorum)
    if len(merged.accepted) < required:
        raise QuorumNotMet(round_, len(merged.accepted), required, missing, merged.rejected)

    nodes_used = ", ".join(map(str, merged.accepted))
    model = aggregator.advance(current, merged, f"round {round_}'s updates from nodes {nodes_used}")
    publish_model(run_dir, config, round_ + 1)  # before round.json: a rerun publishes it again
    first_mirror = round_ % len(config.data.mirrors)
    manifest = run_manifest(config, first_mirror)
    heldout = load_heldout(run_dir, config, manifest, first_mirror)
    node_metrics = _node_metrics(run_dir, round_, merged.accepted)
    starts = [figure(m, "started_at") for m in node_metrics.values()]
    started = min((at for at in starts if at > 0), default=time.time())
    round_metrics = {
        "round": round_,
        **heldout_metrics(model.network, heldout),
        "nodes_used": len(merged.accepted),
        "nodes_missing": missing,
        "nodes_rejected": merged.rejected,
        "nodes_clipped": merged.clipped,
        "aggregation_rule": config.server.rule,
        "quorum_required": required,
        "train_samples": merged.samples,
        "update_bytes": sum(dict(updates)[n].stat().st_size for n in merged.accepted),
        **round_bytes(run_dir, round_, config.run.nodes),  # every job that returned, by kind
        "local_test_accuracy": sum(figure(m, "local_test_accuracy") for m in node_metrics.values())
        / max(len(node_metrics), 1),
        "bytes_downloaded": sum(figure(m, "bytes_downloaded") for m in node_metrics.values()),
        "mirror_failovers": sum(figure(m, "mirror_failovers") for m in node_metrics.values()),
        "coverage": training_coverage(run_dir, config, manifest, round_),
        **_sources_per_class(round_, node_metrics),
        **round_evictions(run_dir, round_, config.run.nodes),  # and the work they lost and saved
        "started_at": started,  # with seconds: the report's wall time and node utilization
        "seconds": time.time() - started,
    }
    # Before round.json, which marks the round done: a rerun after a kill rewrites both.
    log_round(run_dir, round_metrics)
    write_text(metrics_path, json.dumps(round_metrics, indent=1) + "\n")
    return round_metrics


def _log(
    run_dir: Path, config: RunConfig, round_: int, merged: MergeResult, missing: list[int]
) -> None:
    """One line per node the round goes without or scaled down (the job's output, job.out)."""
    for node, reason in sorted(merged.rejected.items()):
        print(f"round {round_} node {node}: rejected: {reason}", flush=True)
    for node, norm in sorted(merged.clipped.items()):
        print(
            f"round {round_} node {node}: clipped: norm {norm:.4g} scaled down to "
            f"{config.server.clip_norm:.4g}",
            flush=True,
        )
    for node in missing:
        why = node_dir(run_dir, round_, node) / MISSING_MARK
        print(
            f"round {round_} node {node}: missing"
            + (f" ({why.read_text().strip()})" if why.is_file() else ""),
            flush=True,
        )


def _sources_per_class(round_: int, node_metrics: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """{"sources_per_class": {"min": min of the nodes' min, "mean": mean of their means}} over
    the accepted nodes that reported it, or nothing when none did (node jobs before it existed).

    metrics.json comes from the node: a report that is not a count and a finite number is named
    in the job's output and left out, never a reason to fail the round.
    """
    reported = []
    for node, metrics in node_metrics.items():
        value = metrics.get("sources_per_class")
        if value is None:
            continue
        if _is_count_summary(value):
            reported.append(value)
        else:
            print(
                f"round {round_} node {node}: sources_per_class {value!r} ignored: expected "
                '{"min": integer, "mean": number}, both >= 0',
                flush=True,
            )
    if not reported:
        return {}
    return {
        "sources_per_class": {
            "min": min(r["min"] for r in reported),
            "mean": sum(r["mean"] for r in reported) / len(reported),
        }
    }


def _is_count_summary(value: Any) -> bool:
    if not isinstance(value, dict) or value.keys() != {"min", "mean"}:
        return False
    low, mean = value["min"], value["mean"]
    return (
        type(low) is int
        and low >= 0
        and type(mean) in (int, float)
        and math.isfinite(mean)
        and mean >= low
    )


def _node_metrics(run_dir: Path, round_: int, nodes: list[int]) -> dict[int, dict[str, Any]]:
    found = {}
    for node in nodes:
        path = node_dir(run_dir, round_, node) / METRICS_FILE
        metrics = read_node_metrics(path, f"round {round_} node {node}") if path.is_file() else None
        if metrics is not None:
            found[node] = metrics
    return found
