"""SFTP as an upload target: mirrors whose owners give SSH access rather than an FTP login.

Nodes still read over FTP; this only writes the dataset into the directory an FTP server (or
anything else) serves. Authentication is by key only (ssh-agent, ~/.ssh or --identity) and host
keys are checked against known_hosts, as for `dagtrain submit --remote`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

from node_payload.common.errors import UserError
from node_payload.common.mirror_url import split_url
from pipeline.remote import SshOptions, SshSession, Target

CHUNK = 256 * 1024
SFTP_FORM = "sftp://[user@]host[:port]/path (/~/path: below the login directory)"


@dataclass(frozen=True)
class SftpUrl:
    target: Target
    root: str  # "~/..." (below the login directory) or an absolute path
    label: str


def parse_sftp_url(url: str) -> SftpUrl:
    """`sftp://user@host:port/srv/data` is /srv/data; `sftp://user@host/~/data` is ~/data."""
    parts, port, label = split_url(url, "sftp", 22, SFTP_FORM)
    if parts.password is not None:
        raise UserError(
            f"mirror {label}: sftp URLs take no password; the key comes from ssh-agent, "
            "~/.ssh or --identity FILE"
        )
    if parts.query:
        raise UserError(f"mirror {label}: sftp URLs take no parameters ({parts.query!r})")
    path = unquote(parts.path)
    if path in ("", "/", "/~", "/~/"):
        root = "~"
    elif path.startswith("/~/"):
        root = "~/" + path[3:].strip("/")
    else:
        root = "/" + path.strip("/")
    user = unquote(parts.username) if parts.username else None
    return SftpUrl(Target(user, parts.hostname, port), root, label)


class SftpTransport:
    """Dataset-relative file operations on one SFTP server (see pipeline.upload.Transport)."""

    def __init__(
        self, url: SftpUrl, known_hosts: Path | None = None, identity: Path | None = None
    ) -> None:
        self.label = url.label
        self._ssh = SshSession(SshOptions(url.target, known_hosts, identity), role="mirror")
        self._sftp = self._ssh.sftp
        self._root = PurePosixPath(self._ssh.path(url.root))
        self._made: set[str] = set()

    def _path(self, path: str) -> str:
        return str(self._root / path)

    def size(self, path: str) -> int | None:
        try:
            return self._sftp.stat(self._path(path)).st_size
        except FileNotFoundError:
            return None

    def read(self, path: str) -> bytes | None:
        try:
            with self._sftp.open(self._path(path), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def sha256(self, path: str) -> str:
        digest = hashlib.sha256()
        with self._sftp.open(self._path(path), "rb") as f:
            f.prefetch()  # pipelined reads: one round trip per file, not per chunk
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def makedirs(self, directory: str) -> None:
        full = self._path(directory) if directory else str(self._root)
        if full not in self._made:
            self._ssh.makedirs(full)
            self._made.add(full)

    def put(self, local: Path, path: str, offset: int, sent: Callable[[int], None]) -> None:
        """Write local[offset:] to path at offset (the file exists when offset > 0)."""
        with (
            local.open("rb") as src,
            self._sftp.open(self._path(path), "r+b" if offset else "wb") as dst,
        ):
            src.seek(offset)
            dst.seek(offset)
            dst.set_pipelined(True)
            while chunk := src.read(CHUNK):
                dst.write(chunk)
                sent(len(chunk))

    def rename(self, src: str, dst: str) -> None:
        """Atomic replace (OpenSSH's posix-rename): readers see the old file or the new one."""
        self._sftp.posix_rename(self._path(src), self._path(dst))

    def delete(self, path: str) -> None:
        try:
            self._sftp.remove(self._path(path))
        except FileNotFoundError:
            return

    def close(self) -> None:
        self._ssh.close()
