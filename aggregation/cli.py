"""`python -m aggregation`: the aggregation job's command line and its exit codes."""

import argparse
import sys
from pathlib import Path

from aggregation.quorum import QuorumNotMet
from aggregation.round_step import aggregate_round
from node_payload.errors import EXIT_FATAL, EXIT_OK, EXIT_RETRYABLE, UserError
from node_payload.fetch import DataUnreachable
from node_payload.run_config import read_run_config
from node_payload.tensor_io import BadTensorFile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dagtrain-aggregate", description="Merge a round's updates into the next model."
    )
    parser.add_argument("--config", type=Path, required=True, help="the run's config.toml")
    parser.add_argument("--round", type=int, required=True, dest="round_")
    args = parser.parse_args(argv)
    run_dir = args.config.resolve().parent
    try:
        metrics = aggregate_round(run_dir, read_run_config(args.config), args.round_)
    except QuorumNotMet as exc:
        print(f"dagtrain aggregate: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except DataUnreachable as exc:
        print(f"dagtrain aggregate round {args.round_}: {exc}", file=sys.stderr)
        return EXIT_RETRYABLE
    except (UserError, BadTensorFile) as exc:
        print(f"dagtrain aggregate round {args.round_}: fatal: {exc}", file=sys.stderr)
        return EXIT_FATAL
    print(
        f"dagtrain aggregate round {args.round_}: {metrics['nodes_used']} updates merged, "
        f"held-out accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}"
    )
    return EXIT_OK
