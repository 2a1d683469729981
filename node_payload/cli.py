"""`dagtrain.pyz node`: the node job's command line and its exit codes."""

import argparse
from pathlib import Path

from node_payload.checkpoint import CheckpointTaken
from node_payload.checkpoint_files import CHECKPOINT_EXIT
from node_payload.common.heap import keep_freed_memory
from node_payload.common.job_exit import run_job
from node_payload.node_job import NodeTask, run_node


def parse_args(argv: list[str] | None) -> NodeTask:
    parser = argparse.ArgumentParser(
        prog="dagtrain-node", description="Train the global model on this node's local data."
    )
    parser.add_argument("--config", type=Path, required=True, help="the run's config.toml")
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        help="this round's global model, or its pointer (.json) to fetch it from the mirrors",
    )
    parser.add_argument("--round", type=int, required=True, dest="round_")
    parser.add_argument("--node", type=int, required=True)
    parser.add_argument("--attempt", type=int, default=0, help="DAGMan's $(RETRY)")
    parser.add_argument("--out", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    return NodeTask(args.config, args.model, args.round_, args.node, args.attempt, args.out)


def main(argv: list[str] | None = None) -> int:
    task = parse_args(argv)
    keep_freed_memory()

    def work() -> str:
        metrics = run_node(task)
        return (
            f"{metrics['train_samples']} fragments, {metrics['local_steps']} steps, local test "
            f"accuracy {metrics['local_test_accuracy']:.3f}, {metrics['bytes_downloaded']} bytes "
            f"in {metrics['seconds']:.1f} s"
        )

    where = f"dagtrain node (round {task.round_} node {task.node})"
    try:
        return run_job(where, work)
    except CheckpointTaken as taken:  # HTCondor keeps the checkpoint and restarts the job
        print(f"{where}: {taken}, exiting to be restarted")
        return CHECKPOINT_EXIT
