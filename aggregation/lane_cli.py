"""`dagtrain.pyz lane claim|arrive`: the PRE and POST scripts of an asynchronous job.

claim imports no torch (it runs before every job and must start in milliseconds); arrive loads
it only when there is an update to apply.
"""

import argparse
import sys
from pathlib import Path

from aggregation.async_claim import claim
from node_payload.common.errors import UserError
from node_payload.common.run_config import read_run_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dagtrain-lane", description=__doc__)
    parser.add_argument("action", choices=("claim", "arrive"))
    parser.add_argument("--config", type=Path, required=True, help="the run's config.toml")
    parser.add_argument("--lane", type=int, required=True)
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--return", type=int, default=0, dest="returned", help="DAGMan $RETURN")
    parser.add_argument("--retry", type=int, default=0, help="DAGMan $RETRY")
    parser.add_argument("--max-retries", type=int, default=0, help="DAGMan $MAX_RETRIES")
    args = parser.parse_args(argv)
    run_dir = args.config.resolve().parent
    try:
        config = read_run_config(args.config)
        if args.action == "claim":
            return claim(run_dir, config, args.lane, args.step)
        from aggregation.async_apply import arrive

        return arrive(
            run_dir, config, args.lane, args.step, args.returned, args.retry, args.max_retries
        )
    except UserError as exc:
        print(
            f"dagtrain lane {args.action} lane {args.lane} step {args.step}: {exc}", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
