"""`dagtrain.pyz aggregate`: the aggregation job's command line and its exit codes."""

import argparse
from pathlib import Path

from aggregation.round_step import aggregate_round
from node_payload.common.job_exit import run_job
from node_payload.common.run_config import read_run_config
from node_payload.common.run_layout import make_node_dirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dagtrain-aggregate", description="Merge a round's updates into the next model."
    )
    parser.add_argument("--config", type=Path, required=True, help="the run's config.toml")
    parser.add_argument("--round", type=int, required=True, dest="round_")
    args = parser.parse_args(argv)
    run_dir = args.config.resolve().parent

    def work() -> str:
        config = read_run_config(args.config)
        metrics = aggregate_round(run_dir, config, args.round_)
        if args.round_ + 1 < config.run.rounds:  # the next round's jobs are submitted next
            make_node_dirs(run_dir, args.round_ + 1, config.run.nodes)
        return (
            f"{metrics['nodes_used']} updates merged, held-out accuracy "
            f"{metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}"
        )

    return run_job(f"dagtrain aggregate round {args.round_}", work)
