"""The one table of job commands: what a DAG node runs as `python dagtrain.pyz COMMAND ...`.

The payload's `__main__` calls `main` here. A command's module is imported only when it runs, so
the torch-free ones (post, lane claim) start in milliseconds. The table lives in `aggregation`
because it may import `node_payload`, so one table covers the commands of both packages; each
module has `main(argv) -> int` and its exit codes come from `node_payload.common.errors`.
"""

import sys

COMMANDS = {
    "node": "node_payload.cli",  # an execute node: train on local data, return an update
    "aggregate": "aggregation.cli",  # a synchronous round's aggregation job
    "post": "aggregation.node_post",  # a synchronous node job's POST script
    "lane": "aggregation.lane_cli",  # an asynchronous job's PRE (claim) and POST (arrive) script
    "report": "aggregation.report",  # the FINAL node
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: dagtrain.pyz {{{'|'.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return __import__(COMMANDS[argv[0]], fromlist=["main"]).main(argv[1:])
