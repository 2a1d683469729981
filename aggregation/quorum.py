"""How many valid updates a round needs before the global model may move."""

import math
from fractions import Fraction

from node_payload.common.errors import UserError
from node_payload.common.run_layout import JOB_ERR, round_nodes


def required_updates(nodes: int, quorum: float) -> int:
    """ceil(quorum * nodes) on the decimal the user wrote: in binary 0.2 * 5 is just above 1."""
    if nodes < 1:
        raise UserError(f"a round needs at least one node, got nodes = {nodes}")
    if not 0 < quorum <= 1:
        raise UserError(f"quorum = {quorum} must be a fraction of the nodes in (0, 1]")
    return math.ceil(Fraction(repr(float(quorum))) * nodes)


class QuorumNotMet(UserError):
    """Too few valid updates: a fatal exit, so DAGMan stops without retrying and writes a
    rescue DAG; retrying the aggregation alone would find the same updates."""

    def __init__(
        self,
        round_: int,
        valid: int,
        required: int,
        missing: list[int],
        rejected: dict[int, str],
    ) -> None:
        lines = [
            f"round {round_}: only {valid} valid updates, the quorum needs {required}",
            f"missing nodes: {_nodes(missing)}",
            f"rejected nodes: {_nodes(sorted(rejected))}",
            *(f"  node {node}: {reason}" for node, reason in sorted(rejected.items())),
            f"Fix the cause (see {round_nodes(round_)}/{JOB_ERR} and the reasons above), then "
            "resume with `dagtrain submit RUN_DIR` on a pool or `dagtrain run RUN_DIR` on one "
            "machine: the missing nodes run again and the rescue DAG resumes at this round.",
        ]
        super().__init__("\n".join(lines))


def _nodes(nodes: list[int]) -> str:
    return ", ".join(map(str, nodes)) if nodes else "none"
