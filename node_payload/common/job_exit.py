"""Turning a job's outcome into its exit code, the one signal DAGMan's RETRY and POST act on."""

import sys
from collections.abc import Callable

from node_payload.common.errors import EXIT_FATAL, EXIT_OK, EXIT_RETRYABLE, UserError
from node_payload.common.tensor_io import BadTensorFile
from node_payload.fetch import DataUnreachable


def run_job(where: str, work: Callable[[], str]) -> int:
    """Run `work` (which returns a one-line summary); map failures to retryable or fatal codes."""
    try:
        summary = work()
    except DataUnreachable as exc:
        print(f"{where}: data unreachable, retry later: {exc}", file=sys.stderr)
        return EXIT_RETRYABLE
    except (UserError, BadTensorFile) as exc:
        print(f"{where}: fatal: {exc}", file=sys.stderr)
        return EXIT_FATAL
    print(f"{where}: {summary}")
    return EXIT_OK
