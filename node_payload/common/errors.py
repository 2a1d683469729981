"""Errors and exit codes shared by every job, so DAGMan can tell a retry from a dead end."""

EXIT_OK = 0
EXIT_RETRYABLE = 75  # EX_TEMPFAIL: data unreachable, mirrors down; DAGMan retries the node
EXIT_FATAL = 78  # EX_CONFIG: bad config or model; retrying cannot help (RETRY ... UNLESS-EXIT 78)


class UserError(Exception):
    """A mistake the user can fix; the message names the file, key or node and the fix."""
