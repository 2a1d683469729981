"""Writing files to an FTP server: `dagtrain upload` (pipeline.upload) sends datasets with it, and
a run's aggregation publishes each new global model with it (aggregation.publish).

Standard library only, since the aggregation job runs from the job payload on the submit host.
"""

import hashlib
import io
from collections.abc import Callable
from ftplib import FTP, all_errors, error_perm
from pathlib import Path, PurePosixPath

from node_payload.common.mirror_url import Mirror

CHUNK = 256 * 1024
TIMEOUT_S = 30.0


def failure_reason(exc: BaseException) -> str:
    """Why a transfer to a server failed, in its own words (for one line naming the server)."""
    if isinstance(exc, EOFError):
        return "connection closed by the server"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class FtpTransport:
    """ftplib on one FTP server; the URL's path is below the login directory (RFC 1738)."""

    def __init__(self, mirror: Mirror, timeout_s: float = TIMEOUT_S) -> None:
        self.label = mirror.label
        self._mirror = mirror
        self._ftp = FTP(timeout=mirror.timeout_s or timeout_s)
        try:
            self._ftp.connect(mirror.host, mirror.port)
            self._ftp.login(mirror.user or "anonymous", mirror.password)
            self._ftp.voidcmd("TYPE I")
            self._home = self._ftp.pwd()
        except BaseException:
            self._ftp.close()
            raise
        self._made: set[str] = set()

    def _path(self, path: str) -> str:
        return self._mirror.remote(path)

    def size(self, path: str) -> int | None:
        try:
            return self._ftp.size(self._path(path))
        except error_perm:  # 550: no such file
            return None

    def read(self, path: str) -> bytes | None:
        if self.size(path) is None:
            return None
        buf = io.BytesIO()
        self._ftp.retrbinary(f"RETR {self._path(path)}", buf.write, CHUNK)
        return buf.getvalue()

    def sha256(self, path: str) -> str:
        digest = hashlib.sha256()
        self._ftp.retrbinary(f"RETR {self._path(path)}", digest.update, CHUNK)
        return digest.hexdigest()

    def makedirs(self, directory: str) -> None:
        parts = PurePosixPath(self._path(directory)).parts if self._path(directory) else ()
        for i in range(1, len(parts) + 1):
            prefix = str(PurePosixPath(*parts[:i]))
            if prefix in self._made:
                continue
            try:
                self._ftp.cwd(prefix)  # exists already (MKD's errors do not say so portably)
            except error_perm:
                self._ftp.mkd(prefix)
            self._ftp.cwd(self._home)
            self._made.add(prefix)

    def put(self, local: Path, path: str, offset: int, sent: Callable[[int], None]) -> None:
        """STOR local[offset:], after REST offset when resuming."""
        with local.open("rb") as src:
            src.seek(offset)
            self._ftp.storbinary(
                f"STOR {self._path(path)}",
                src,
                CHUNK,
                callback=lambda chunk: sent(len(chunk)),
                rest=offset or None,
            )

    def rename(self, src: str, dst: str) -> None:
        try:
            self._ftp.rename(self._path(src), self._path(dst))
        except error_perm:
            # Servers that refuse to rename onto an existing file: the old file goes first.
            if self.size(dst) is None:
                raise
            self.delete(dst)
            self._ftp.rename(self._path(src), self._path(dst))

    def delete(self, path: str) -> None:
        try:
            self._ftp.delete(self._path(path))
        except error_perm:
            if self.size(path) is not None:
                raise

    def close(self) -> None:
        try:
            self._ftp.quit()
        except all_errors:
            self._ftp.close()


def part_name(path: str) -> str:
    """The hidden temporary name a file is uploaded to before its rename."""
    p = PurePosixPath(path)
    return str(p.with_name(f".{p.name}.part"))
