"""`dagtrain.pyz post RETURN RETRY MAX_RETRIES NODE`: the POST script of a synchronous node
job (scripts/node_post.sh execs it with DAGMan's $RETURN, $RETRY, $MAX_RETRIES and $JOB, the
node's name, which names its folder), acting on the outcome aggregation.node_outcome decides.
The DAG gives the script to every node (ALL_NODES): for a round's aggregation it returns the
job's exit code, which is what decides a node without a POST script.

Accepted: the node's MISSING mark from an earlier try goes (a compressed update's residual
stays on the execute machine: node_payload/residual_cache.py).
Missing: a MISSING mark says why, for the round's aggregation, `dagtrain status` and the
resume that runs missing nodes again (pipeline.rescue). Standard library only: no torch.
"""

import argparse
import sys
from pathlib import Path

from aggregation.node_outcome import Verdict, decide
from node_payload.common.atomic_file import write_text
from node_payload.common.run_layout import MISSING_MARK, node_dir, round_and_node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dagtrain-post", description=__doc__)
    parser.add_argument("returned", type=int, metavar="RETURN", help="DAGMan $RETURN")
    parser.add_argument("retry", type=int, metavar="RETRY", help="DAGMan $RETRY")
    parser.add_argument("max_retries", type=int, metavar="MAX_RETRIES", help="DAGMan $MAX_RETRIES")
    parser.add_argument("node", metavar="NODE", help="DAGMan $JOB: the node's name")
    args = parser.parse_args(argv)
    job = round_and_node(args.node)
    if job is None:
        return args.returned if 0 <= args.returned < 256 else 1
    job_dir = node_dir(Path(), *job)
    outcome = decide(args.returned, args.retry, args.max_retries, job_dir)
    mark = job_dir / MISSING_MARK
    if outcome.verdict is Verdict.FATAL:
        print(outcome.reason, file=sys.stderr)
    elif outcome.verdict is Verdict.MISSING:
        try:
            write_text(mark, outcome.reason + "\n")
        except OSError as exc:  # the node is missing all the same; the round may go on
            print(f"dagtrain post: cannot mark {job_dir} missing: {exc}", file=sys.stderr)
    elif outcome.verdict is Verdict.ACCEPT:
        mark.unlink(missing_ok=True)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
