"""Federated averaging in one process: a synchronous run's arithmetic without its DAG.

A config's node jobs (their local sets, `train_job`) and server step (`ServerOptimizer`), run
one after another in this process on the prepared dataset read from local disk: no jobs,
mirrors, files or start-up, so a variant of a run on real photographs costs a minute or two
instead of a quarter of an hour. It is for finding what the gap between federated and
centralized training at equal compute depends on (docs/benchmarks.md); the figures a user
reads come from bench_quality.py, through the real commands.

  --set TABLE.KEY=VALUE   any config key, as `dagtrain plan --set` (rounds, local steps, lr, ...)
  --iid                   nodes draw their local sets uniformly from the whole training pool, as
                          the baseline does, instead of a chunk per source image

The round combines the nodes' updates by their plain mean (their sample counts are equal);
faults, quorum, robust rules and compression are left out.

Run:  nice -n 5 .venv/bin/python benchmarks/bench_fedavg.py CONFIG [--set train.lr=0.1 ...]
          [--iid] [--out fedavg.jsonl]
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aggregation.heldout_metrics import heldout_metrics
from aggregation.server_optimizer import ServerOptimizer
from node_payload.batches import to_tensor
from node_payload.sampling import local_sets, node_seed
from node_payload.train import train_job, update_tensors
from pipeline.baseline import (
    dataset_plan,
    initial_model,
    load_heldout,
    read_fragments,
    training_pool,
)
from pipeline.config import load
from pipeline.planner import Plan


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a synchronous run's TOML config")
    parser.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE")
    parser.add_argument("--iid", action="store_true", help="uniform local sets (see above)")
    parser.add_argument("--out", type=Path, default=Path("fedavg.jsonl"), help="appended to")
    return parser.parse_args()


def _local_ids(plan: Plan, round_: int, node: int, iid_pool: list[int] | None) -> list[int]:
    config = plan.config
    seed = node_seed(config.run.seed, round_, node)
    n = config.data.local_train
    if iid_pool is None:
        return local_sets(plan.manifest, seed, n, config.data.local_test)[0]
    start = (round_ * config.run.nodes + node) * n
    return sorted(iid_pool[start : start + n])


def _mean(updates: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """As the mean rule combines equal weights: floats averaged, counters by their maximum."""
    return {
        name: torch.stack([u[name] for u in updates]).mean(0)
        if tensor.is_floating_point()
        else torch.stack([u[name] for u in updates]).max(0).values
        for name, tensor in updates[0].items()
    }


def simulate(plan: Plan, iid: bool) -> dict[str, Any]:
    config = plan.config
    model = initial_model(plan)
    params = {name for name, _ in model.named_parameters()}
    server = ServerOptimizer.from_config(config.server)
    iid_pool = None
    if iid:
        jobs = config.run.nodes * config.run.rounds
        pool = training_pool(plan.manifest, jobs * config.data.local_train, config.run.seed)
        iid_pool = np.random.default_rng(config.run.seed).permutation(pool).tolist()
    for round_ in range(config.run.rounds):
        global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        updates = []
        for node in range(config.run.nodes):
            pixels = read_fragments(
                plan.manifest, plan.dataset_dir, _local_ids(plan, round_, node, iid_pool)
            )
            x = to_tensor(pixels.images, config.model.image_size)
            model.load_state_dict(global_state)
            seed = node_seed(config.run.seed, round_, node)
            train_job(model, x, torch.from_numpy(pixels.labels), config, round_, seed)
            updates.append(update_tensors(global_state, model.state_dict()))
        model.load_state_dict(server.step(global_state, _mean(updates), params))
    return heldout_metrics(model, load_heldout(plan))


def main() -> None:
    args = _arguments()
    plan = dataset_plan(load(args.config, args.set))
    if plan.config.is_async:
        raise SystemExit(f"{args.config}: an asynchronous config; this simulates rounds")
    torch.set_num_threads(plan.config.resources.request_cpus)
    started = time.perf_counter()
    metrics = simulate(plan, args.iid)
    result = {
        "config": str(args.config),
        "set": args.set,
        "iid": args.iid,
        "accuracy": metrics["accuracy"],
        "image_accuracy": metrics["image_accuracy"],
        "loss": metrics["loss"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))
    with args.out.open("a") as out:
        out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
