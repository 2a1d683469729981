"""`dagtrain.pyz post RETURN RETRY MAX_RETRIES NODE_DIR`: the POST script of a
synchronous node job (scripts/node_post.sh execs it with DAGMan's $RETURN, $RETRY and
$MAX_RETRIES), acting on the outcome aggregation.node_outcome decides.

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
from node_payload.common.run_layout import MISSING_MARK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dagtrain-post", description=__doc__)
    parser.add_argument("returned", type=int, metavar="RETURN", help="DAGMan $RETURN")
    parser.add_argument("retry", type=int, metavar="RETRY", help="DAGMan $RETRY")
    parser.add_argument("max_retries", type=int, metavar="MAX_RETRIES", help="DAGMan $MAX_RETRIES")
    parser.add_argument("node_dir", type=Path, metavar="NODE_DIR")
    args = parser.parse_args(argv)
    outcome = decide(args.returned, args.retry, args.max_retries, args.node_dir)
    mark = args.node_dir / MISSING_MARK
    if outcome.verdict is Verdict.FATAL:
        print(outcome.reason, file=sys.stderr)
    elif outcome.verdict is Verdict.MISSING:
        try:
            write_text(mark, outcome.reason + "\n")
        except OSError as exc:  # the node is missing all the same; the round may go on
            print(f"dagtrain post: cannot mark {args.node_dir} missing: {exc}", file=sys.stderr)
    elif outcome.verdict is Verdict.ACCEPT:
        mark.unlink(missing_ok=True)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
