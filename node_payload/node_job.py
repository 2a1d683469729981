"""One node job: fetch a local dataset, train the global model copy, write the update."""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node_payload.checkpoint import Checkpoints, JobIdentity
from node_payload.common.job_bytes import JobBytes, Moved, payload_bytes
from node_payload.common.model_file import load_model
from node_payload.common.run_config import read_run_config
from node_payload.common.run_layout import METRICS_FILE, UPDATE_FILE
from node_payload.common.tensor_io import update_metadata
from node_payload.common.threads import job_threads
from node_payload.compression import write_update
from node_payload.faults import inject, slow_down, slowdown, tamper
from node_payload.fetch import FetchStats
from node_payload.local_data import BlockSource, Tensors, load_fragments, planned_manifest
from node_payload.model_fetch import model_file
from node_payload.sampling import local_sets, node_seed, sources_per_class
from node_payload.train import evaluate, train_job, update_tensors


@dataclass(frozen=True)
class NodeTask:
    config_path: Path
    model_path: Path
    round_: int
    node: int
    attempt: int
    out_dir: Path


def run_node(task: NodeTask) -> dict[str, Any]:
    """Everything a node does; raises DataUnreachable (retry) or UserError (fatal)."""
    started_at = time.time()
    config = read_run_config(task.config_path)
    inject(config, task.round_, task.node)
    seed = node_seed(config.run.seed, task.round_, task.node)  # what the node's data draws from
    threads = job_threads()
    torch.set_num_threads(threads)
    data = config.data
    mirrors = data.mirrors
    first = (task.node + task.attempt) % len(mirrors)
    stats = FetchStats()
    # The global model: given, or from the mirrors by its pointer (whole, or by delta).
    got = model_file(
        task.model_path, config.run.run_id, mirrors, first, data.node_cache, task.out_dir
    )

    manifest = planned_manifest(mirrors, first, data.manifest_sha256, stats)
    train_ids, test_ids = local_sets(manifest, seed, data.local_train, data.local_test)
    image_size = config.model.image_size
    cache = Path(data.node_cache).expanduser() if data.node_cache else None
    # One fetch for both sets: one set of sessions, and reads of both coalesced together.
    source = BlockSource(mirrors, first, stats, cache)
    both = load_fragments(manifest, train_ids + test_ids, source, image_size)
    train = Tensors(both.x[: len(train_ids)], both.y[: len(train_ids)])
    test = Tensors(both.x[len(train_ids) :], both.y[len(train_ids) :])
    fetched_at = time.time()

    model, model_meta = load_model(got.path)
    base_version = int(model_meta["version"])
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Where the run is in its schedule: the round, or (asynchronous) the model's version.
    position = base_version if config.is_async else task.round_
    checkpoints = None
    if config.train.checkpoint_s:
        identity = JobIdentity.of(
            config.run.run_id, task.round_, task.node, [task.config_path, task.model_path]
        )
        checkpoints = Checkpoints(task.out_dir, identity, config.train.checkpoint_s)
    result, schedule, first_step = train_job(
        model, train.x, train.y, config, position, seed, checkpoints
    )
    test_loss, test_accuracy = evaluate(model, test.x, test.y)
    real_seconds = time.time() - started_at
    factor = slowdown(config, task.node)
    slow_down(factor, real_seconds)

    task.out_dir.mkdir(parents=True, exist_ok=True)
    update = tamper(
        config, task.round_, task.node, update_tensors(global_state, model.state_dict())
    )
    metadata = update_metadata(task.round_, task.node, len(train.y), base_version)
    params = {name for name, _ in model.named_parameters()}
    compression, on_machine = write_update(
        update, params, config, metadata, task.node, task.round_, task.out_dir / UPDATE_FILE
    )
    moved = (
        JobBytes(
            through_submit_host=Moved(update_out=compression["update_bytes"]),
            from_mirrors=Moved(data_in=stats.bytes_downloaded),
            on_machine=on_machine,
        )
        + got.moved
        + payload_bytes(task.config_path)
    )
    metrics = {
        "round": task.round_,
        "node": task.node,
        "seed": seed,
        "attempt": task.attempt,
        "train_samples": len(train.y),
        "test_samples": len(test.y),
        "sources_per_class": sources_per_class(manifest, train_ids),  # the local set's diversity
        "local_steps": result.steps,
        "lr": schedule.lr(first_step),  # at the job's first and last step
        "lr_last": schedule.lr(first_step + result.steps - 1),
        "local_loss": result.loss,
        "local_accuracy": result.accuracy,
        "local_test_loss": test_loss,
        "local_test_accuracy": test_accuracy,
        "bytes_downloaded": stats.bytes_downloaded,
        "mirror_failovers": stats.failovers,
        "per_mirror_bytes": stats.per_mirror_bytes,
        "threads": threads,
        "started_at": started_at,
        "fetch_seconds": fetched_at - started_at,
        "seconds": time.time() - started_at,  # as the run saw it: slowed when slowdown > 1
        "real_seconds": real_seconds,
        "slowdown": factor,
        "train_fragments": train_ids,  # for the run's coverage of the training fragments
        "bytes": moved.to_json(),  # by kind and way (node_payload/common/job_bytes.py)
        "model": got.how,  # "given", "whole", "delta", or "whole: why not by delta"
        # Self-checkpointing: when each checkpoint was written and each restart resumed.
        "checkpoints": checkpoints.history.to_json() if checkpoints else None,
        **compression,  # update_bytes; compressed: residual, and kept_fraction, sparsity, ...
    }
    (task.out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics
