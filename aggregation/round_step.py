"""One synchronous round's aggregation: validate, check the quorum, step, save, evaluate.

Idempotent: a round whose next model and metrics already exist is left alone, and the next
model is written atomically after the server state, so a kill at any point loses nothing and
a rerun (DAGMan rescue, local runner resume) produces the same bytes.
"""

import json
import time
from pathlib import Path
from typing import Any

import torch

from aggregation.heldout import heldout_tensors, training_coverage
from aggregation.job_plan import JobPlan
from aggregation.merge import merge_updates
from aggregation.model_check import check_next_model
from aggregation.quorum import QuorumNotMet, required_updates
from aggregation.server_optimizer import ServerOptimizer
from node_payload.common.atomic_file import write_text
from node_payload.common.errors import UserError
from node_payload.common.model_file import load_model, save_model
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import (
    METRICS_FILE,
    MISSING_MARK,
    UPDATE_FILE,
    model_path,
    node_dir,
    round_metrics_path,
    server_state_path,
)
from node_payload.common.tensor_io import load_tensors, save_tensors
from node_payload.common.threads import job_threads
from node_payload.train import evaluate


def _node_metrics(run_dir: Path, round_: int, nodes: list[int]) -> list[dict[str, Any]]:
    found = []
    for node in nodes:
        path = node_dir(run_dir, round_, node) / METRICS_FILE
        if path.is_file():
            found.append(json.loads(path.read_text()))
    return found


def _optimizer(config: RunConfig, run_dir: Path, round_: int) -> ServerOptimizer:
    optimizer = ServerOptimizer.from_config(config.server)
    state = server_state_path(run_dir, round_)
    try:
        optimizer.load_state_dict(*load_tensors(state))
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"{state}: cannot resume the server optimizer: {exc}") from None
    return optimizer


def aggregate_round(run_dir: Path, config: RunConfig, round_: int) -> dict[str, Any]:
    """Returns the round's metrics; raises QuorumNotMet when too few valid updates arrived."""
    metrics_path = round_metrics_path(run_dir, round_)
    next_model = model_path(run_dir, round_ + 1)
    if metrics_path.is_file() and next_model.is_file():
        return json.loads(metrics_path.read_text())
    torch.set_num_threads(job_threads())
    nodes = config.run.nodes
    model, metadata = load_model(model_path(run_dir, round_))
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    present = [(n, node_dir(run_dir, round_, n) / UPDATE_FILE) for n in range(nodes)]
    # A symbolic link, even a dangling one, is something a node sent: validation rejects it.
    updates = [(n, path) for n, path in present if path.is_file() or path.is_symlink()]
    missing = [n for n, path in present if (n, path) not in updates]
    server = config.server
    plan = JobPlan.from_config(config)
    merged = merge_updates(
        global_state,
        updates,
        server.max_update_norm,
        round_,
        server.rule,
        server.trim,
        server.clip_norm,
        plan=plan,
    )
    for node, reason in sorted(merged.rejected.items()):
        print(f"round {round_} node {node}: rejected: {reason}", flush=True)
    for node, norm in sorted(merged.clipped.items()):
        print(
            f"round {round_} node {node}: clipped: norm {norm:.4g} scaled down to "
            f"{server.clip_norm:.4g}",
            flush=True,
        )
    for node in missing:
        why = node_dir(run_dir, round_, node) / MISSING_MARK
        print(
            f"round {round_} node {node}: missing"
            + (f" ({why.read_text().strip()})" if why.is_file() else ""),
            flush=True,
        )
    required = required_updates(nodes, config.run.quorum)
    if len(merged.accepted) < required:
        raise QuorumNotMet(round_, len(merged.accepted), required, missing, merged.rejected)

    optimizer = _optimizer(config, run_dir, round_)
    param_names = {name for name, _ in model.named_parameters()}
    state = optimizer.step(global_state, merged.mean_update, param_names)
    nodes_used = ", ".join(map(str, merged.accepted))
    check_next_model(
        state, round_ + 1, plan.steps, f"round {round_}'s updates from nodes {nodes_used}"
    )
    model.load_state_dict(state)
    save_tensors(server_state_path(run_dir, round_ + 1), *optimizer.state_dict())
    save_model(next_model, model, {**metadata, "version": str(round_ + 1)})

    x, y = heldout_tensors(run_dir, config, round_ % len(config.data.mirrors))
    loss, accuracy = evaluate(model, x, y)
    node_metrics = _node_metrics(run_dir, round_, merged.accepted)
    started = min((m["started_at"] for m in node_metrics), default=time.time())
    round_metrics = {
        "round": round_,
        "accuracy": accuracy,
        "loss": loss,
        "heldout_samples": len(y),
        "nodes_used": len(merged.accepted),
        "nodes_missing": missing,
        "nodes_rejected": merged.rejected,
        "nodes_clipped": merged.clipped,
        "aggregation_rule": server.rule,
        "quorum_required": required,
        "train_samples": merged.samples,
        "update_bytes": sum(dict(updates)[n].stat().st_size for n in merged.accepted),
        "local_test_accuracy": sum(m["local_test_accuracy"] for m in node_metrics)
        / max(len(node_metrics), 1),
        "bytes_downloaded": sum(m["bytes_downloaded"] for m in node_metrics),
        "mirror_failovers": sum(m["mirror_failovers"] for m in node_metrics),
        "coverage": training_coverage(run_dir, config, round_, round_ % len(config.data.mirrors)),
        "started_at": started,  # with seconds: the report's wall time and node utilization
        "seconds": time.time() - started,
    }
    write_text(metrics_path, json.dumps(round_metrics, indent=1) + "\n")
    return round_metrics
