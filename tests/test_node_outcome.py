"""The one node-outcome policy both POST scripts follow (the synchronous node_post.sh through
aggregation.node_post, the asynchronous lane.sh arrive through aggregation.async_apply)."""

from pathlib import Path

import pytest

from aggregation.node_outcome import Outcome, Verdict, decide
from node_payload.common.errors import EXIT_FATAL, EXIT_RETRYABLE

JOB = Path("rounds/r001/n002")


@pytest.mark.parametrize(
    ("returned", "retry", "outcome"),
    [
        (0, 0, Outcome(Verdict.ACCEPT)),
        (0, 2, Outcome(Verdict.ACCEPT)),
        (EXIT_RETRYABLE, 0, Outcome(Verdict.RETRY, EXIT_RETRYABLE)),
        (1, 1, Outcome(Verdict.RETRY, 1)),
        (-9, 0, Outcome(Verdict.RETRY, 1)),  # killed by a signal: an exit code cannot be negative
        (-999, 1, Outcome(Verdict.RETRY, 1)),
        (EXIT_FATAL, 0, Outcome(Verdict.FATAL, EXIT_FATAL, f"fatal error, see {JOB}/job.err")),
        (EXIT_FATAL, 2, Outcome(Verdict.FATAL, EXIT_FATAL, f"fatal error, see {JOB}/job.err")),
        (
            EXIT_RETRYABLE,
            2,
            Outcome(Verdict.MISSING, reason="failed 3 times, last exit code 75"),
        ),
        (-9, 2, Outcome(Verdict.MISSING, reason="failed 3 times, last killed by signal 9")),
        (
            -1002,
            0,
            Outcome(
                Verdict.MISSING,
                reason="removed (deadline passed or held), DAGMan return value -1002",
            ),
        ),
        (
            -1001,
            0,
            Outcome(
                Verdict.MISSING,
                reason="removed (deadline passed or held), DAGMan return value -1001",
            ),
        ),
    ],
)
def test_decide(returned: int, retry: int, outcome: Outcome) -> None:
    assert decide(returned, retry, 2, JOB) == outcome


def test_without_retries_a_failure_is_missing_at_once() -> None:
    assert decide(1, 0, 0, JOB) == Outcome(
        Verdict.MISSING, reason="failed 1 times, last exit code 1"
    )
