"""Mirror URLs: what the config, the planner, the uploader and the node job all parse.

`ftp://[user[:password]@]host[:port][/path][?timeout=S]`; the password never reaches a log line.
"""

import re
from dataclasses import dataclass
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from node_payload.common.errors import UserError

_LINE_END = re.compile(r"[\r\n]")  # would end an FTP command early: ftplib refuses them


def redact(url: str) -> str:
    """The URL without its password, for log lines, error messages and stats keys."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}@{hostport}" if at else hostport
    return parts._replace(netloc=netloc).geturl()


def split_url(url: str, scheme: str, default_port: int, form: str) -> tuple[SplitResult, int, str]:
    """The URL's parts, port and password-free label; a malformed URL is one message naming it."""
    label = redact(url)
    try:
        parts = urlsplit(url)
        port = parts.port or default_port
    except ValueError as exc:
        raise UserError(f"mirror {label}: not a valid URL ({exc})") from None
    if parts.scheme != scheme or not parts.hostname:
        raise UserError(f"mirror {label}: expected {form}")
    return parts, port, label


def _timeout(query: str, label: str) -> float | None:
    """`?timeout=SECONDS`: a per-mirror read timeout (a far mirror may need longer)."""
    params = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(params) - {"timeout"})
    if unknown:
        raise UserError(f"mirror {label}: unknown URL parameter {unknown[0]!r} (allowed: timeout)")
    if "timeout" not in params:
        return None
    try:
        value = float(params["timeout"][-1])
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise UserError(f"mirror {label}: timeout must be a number of seconds in (0, 3600]")
    return value


@dataclass(frozen=True)
class Mirror:
    """A parsed mirror URL `ftp://[user[:password]@]host[:port][/path][?timeout=S]`.

    path = dataset root, relative to the login directory (RFC 1738).
    """

    host: str
    port: int
    user: str
    password: str
    root: str
    label: str
    timeout_s: float | None = None

    @classmethod
    def parse(cls, url: str) -> "Mirror":
        parts, port, label = split_url(url, "ftp", 21, "ftp://[user[:password]@]host[:port][/path]")
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
        root = unquote(parts.path.strip("/"))
        if any(_LINE_END.search(part) for part in (user, password, root)):
            raise UserError(  # else a bare ValueError from ftplib on every node
                f"mirror {label}: a line break (%0D or %0A) in its user, password or path; "
                "fix the URL in [data] mirrors"
            )
        return cls(
            host=parts.hostname,
            port=port,
            user=user,
            password=password,
            root=root,
            label=label,
            timeout_s=_timeout(parts.query, label),
        )

    def remote(self, path: str) -> str:
        return f"{self.root}/{path}" if self.root else path
