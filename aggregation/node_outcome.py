"""What becomes of a finished node job, from what DAGMan tells its POST script: one policy for
the synchronous POST script (aggregation.node_post) and the asynchronous one (async_apply).

- $RETURN 0: accepted; the update is the aggregation's to check.
- EXIT_FATAL (a bad config or model): fatal. Retrying cannot help (the DAG's RETRY ... UNLESS-EXIT
  says so too), so the node fails, and with it the DAG or the lane; once the cause is fixed, a
  rescue DAG runs the job again.
- -1001 (never submitted) or -1002 (removed at the deadline, or held): missing at once; a retry
  would meet the same deadline.
- Any other code, or -1 to -999 (killed by signal N: the volunteer's machine killed it):
  retried while tries are left, then missing. A synchronous round goes on without a missing
  node if the quorum holds; a lane goes on with its next job.

Standard library only: it runs after every node job and must start in milliseconds.
"""

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from node_payload.common.errors import EXIT_FATAL, EXIT_OK
from node_payload.common.run_layout import JOB_ERR

_NOT_RUN = -1000  # $RETURN at or below this: DAGMan never ran the job to its end (-1001, -1002)


class Verdict(StrEnum):
    ACCEPT = "accept"
    RETRY = "retry"
    MISSING = "missing"
    FATAL = "fatal"


@dataclass(frozen=True)
class Outcome:
    """exit_code: what the POST script returns (DAGMan retries the node on a non-zero code
    while tries are left, and fails it after the last); reason: for a missing or fatal job, a
    sentence for its MISSING mark, the ledger or the log."""

    verdict: Verdict
    exit_code: int = EXIT_OK
    reason: str = ""


def decide(returned: int, retry: int, max_retries: int, job_dir: Path) -> Outcome:
    """The outcome of the job in job_dir from DAGMan's $RETURN, $RETRY and $MAX_RETRIES."""
    if returned == EXIT_OK:
        return Outcome(Verdict.ACCEPT)
    if returned == EXIT_FATAL:
        return Outcome(Verdict.FATAL, EXIT_FATAL, f"fatal error, see {job_dir / JOB_ERR}")
    if returned <= _NOT_RUN:
        reason = f"removed (deadline passed or held), DAGMan return value {returned}"
        return Outcome(Verdict.MISSING, reason=reason)
    if retry < max_retries:
        return Outcome(Verdict.RETRY, max(returned, 1))  # an exit code cannot be negative
    if returned < 0:
        reason = f"failed {retry + 1} times, last killed by signal {-returned}"
    else:
        reason = f"failed {retry + 1} times, last exit code {returned}"
    return Outcome(Verdict.MISSING, reason=reason)
