"""`dagtrain upload`: copy a prepared dataset to FTP and SFTP mirrors, resumably and verified.

Nodes trust a mirror's manifest.json to describe the files beside it, so a mirror must never
show a manifest whose files are incomplete or another dataset's:

- every data file goes to a hidden temporary name and is renamed into place once its size (and,
  unless `verify` is off, its sha256 read back from the mirror) matches the manifest, so no
  file is ever half-written under its final name;
- manifest.json is uploaded last, the same way, so a mirror holding a manifest holds its data;
- a mirror holding another dataset's manifest is refused before anything is written to any
  mirror; with `replace`, its old manifest is removed first, so nodes stop using it before any
  of its files change.

Resuming is cheap: files already in place (right size and hash) are kept, and a temporary file
left by an interrupted upload is continued from its current size (FTP REST + STOR, SFTP seek).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ftplib import all_errors
from pathlib import Path, PurePosixPath
from typing import Protocol

import paramiko
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from aggregation.ftp_transport import FtpTransport, failure_reason, part_name
from node_payload.common.errors import UserError
from node_payload.common.manifest import DataFile, Manifest
from node_payload.common.mirror_url import Mirror, redact
from pipeline.sftp_transport import SftpTransport, parse_sftp_url

MANIFEST = "manifest.json"


class Transport(Protocol):
    """File operations on one mirror, with paths relative to its dataset root."""

    label: str

    def size(self, path: str) -> int | None: ...  # None: no such file

    def read(self, path: str) -> bytes | None: ...

    def sha256(self, path: str) -> str: ...  # a streamed read of the whole remote file

    def makedirs(self, directory: str) -> None: ...

    def put(self, local: Path, path: str, offset: int, sent: Callable[[int], None]) -> None: ...

    def rename(self, src: str, dst: str) -> None: ...  # replaces dst

    def delete(self, path: str) -> None: ...  # a missing file is fine

    def close(self) -> None: ...


def connect(url: str, known_hosts: Path | None = None, identity: Path | None = None) -> Transport:
    """A transport for an ftp:// or sftp:// URL; every failure is one UserError naming it."""
    if url.startswith("sftp:"):
        return SftpTransport(parse_sftp_url(url), known_hosts, identity)
    if not url.startswith("ftp:"):
        raise UserError(f"mirror {redact(url)}: expected an ftp:// or sftp:// URL")
    mirror = Mirror.parse(url)
    try:
        return FtpTransport(mirror)
    except all_errors as exc:
        raise UserError(f"mirror {mirror.label}: cannot log in: {failure_reason(exc)}") from None


@dataclass
class MirrorUpload:
    """What one mirror needed: files sent, files already in place, bytes sent."""

    label: str
    sent_files: int = 0
    kept_files: int = 0
    sent_bytes: int = 0
    resumed_bytes: int = 0  # bytes of partial files that were continued, not sent again
    replaced: bool = False  # an old dataset's manifest was removed first


class _Mirror:
    """Uploads one dataset to one mirror, reporting to a progress bar."""

    def __init__(
        self,
        transport: Transport,
        dataset: Path,
        files: list[DataFile],
        progress: Progress,
        verify: bool,
    ) -> None:
        self.t = transport
        self.dataset = dataset
        self.files = files
        self.progress = progress
        self.verify = verify
        self.result = MirrorUpload(transport.label)
        total = sum(f.bytes for f in files) + (dataset / MANIFEST).stat().st_size
        self.bar = progress.add_task(transport.label, total=total)

    def _sent(self, n: int) -> None:
        self.result.sent_bytes += n
        self.progress.advance(self.bar, n)

    def _status(self, what: str) -> None:
        self.progress.update(self.bar, description=f"{self.t.label} {what}")

    def _in_place(self, f: DataFile) -> bool:
        if self.t.size(f.path) != f.bytes:
            return False
        if not self.verify:
            return True
        self._status(f"verifying {f.path}")
        return self.t.sha256(f.path) == f.sha256

    def _store(self, f: DataFile) -> None:
        """Upload to the temporary name (continuing a partial one), check it, rename it."""
        local = self.dataset / f.path
        part = part_name(f.path)
        offset = self.t.size(part) or 0
        if not ((0 < offset <= f.bytes and self._send(f, part, offset)) or self._send(f, part, 0)):
            self._mismatch(f, local)
        self.t.rename(part, f.path)
        self.result.sent_files += 1

    def _send(self, f: DataFile, part: str, offset: int) -> bool:
        """Send the file from offset and check what the mirror holds.

        A continued file is always checked by hash: its start was written by an earlier run,
        possibly of another dataset.
        """
        self._status(f"sending {f.path}")
        self.result.resumed_bytes += offset
        self.progress.advance(self.bar, offset)
        self.t.put(self.dataset / f.path, part, offset, self._sent)
        if self.t.size(part) == f.bytes:
            if not (self.verify or offset):
                return True
            self._status(f"verifying {f.path}")
            if self.t.sha256(part) == f.sha256:
                return True
        self.progress.advance(self.bar, -f.bytes)
        self.result.resumed_bytes -= offset
        return False

    def _mismatch(self, f: DataFile, local: Path) -> None:
        digest = hashlib.sha256()
        with local.open("rb") as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != f.sha256:
            raise UserError(
                f"{local}: its sha256 differs from the manifest's: the prepared dataset is "
                "damaged; prepare it again"
            )
        raise UserError(
            f"mirror {self.t.label}: {f.path} reads back different bytes than were sent "
            "(a full disk or a faulty server?); it was left under a temporary name"
        )

    def upload(self, manifest_bytes: bytes, remote_manifest: bytes | None) -> MirrorUpload:
        if remote_manifest is not None and remote_manifest != manifest_bytes:
            self._status("removing the old manifest")
            self.t.delete(MANIFEST)  # first: nodes stop trusting the old files now
            self.result.replaced = True
        self.t.makedirs("")
        for f in self.files:
            parent = str(PurePosixPath(f.path).parent)
            self.t.makedirs("" if parent == "." else parent)
            if self._in_place(f):
                self.result.kept_files += 1
                self.progress.advance(self.bar, f.bytes)
            else:
                self._store(f)
        if remote_manifest == manifest_bytes:
            self.result.kept_files += 1
            self.progress.advance(self.bar, len(manifest_bytes))
        else:
            self._store(DataFile(MANIFEST, len(manifest_bytes), _sha256(manifest_bytes)))
        self._status("done")
        return self.result


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dataset_files(dataset: Path) -> tuple[bytes, list[DataFile]]:
    """The manifest's bytes and its data files, each present locally with its size."""
    manifest = Manifest.load(dataset / MANIFEST)
    files = manifest.files()
    for f in files:
        local = dataset / f.path
        size = local.stat().st_size if local.is_file() else None
        if size != f.bytes:
            found = "missing" if size is None else f"{size} bytes, not {f.bytes}"
            raise UserError(f"{local}: {found}; the prepared dataset is incomplete")
    return manifest.to_bytes(), files


def _open_all(urls: list[str], known_hosts: Path | None, identity: Path | None) -> list[Transport]:
    transports: list[Transport] = []
    try:
        for url in urls:
            transports.append(connect(url, known_hosts, identity))
    except BaseException:
        for t in transports:
            t.close()
        raise
    return transports


def upload(
    dataset: Path,
    urls: list[str],
    *,
    replace: bool = False,
    verify: bool = True,
    known_hosts: Path | None = None,
    identity: Path | None = None,
    console: Console | None = None,
) -> list[MirrorUpload]:
    """Copy the prepared dataset to every mirror (in parallel); see the module docstring.

    Raises UserError naming the mirrors that hold another dataset (before writing anything) or
    that failed during the upload (the others are finished; run again to resume).
    """
    if not urls:
        raise UserError("name at least one mirror URL (ftp://... or sftp://...)")
    dataset = Path(dataset)
    if not (dataset / MANIFEST).is_file():
        raise UserError(f"{dataset}: not a prepared dataset (no {MANIFEST})")
    manifest_bytes, files = _dataset_files(dataset)
    transports = _open_all(urls, known_hosts, identity)
    try:
        remote = [_held_manifest(t) for t in transports]
        other = [
            t.label
            for t, held in zip(transports, remote, strict=True)
            if held is not None and held != manifest_bytes
        ]
        if other and not replace:
            raise UserError(
                f"{', '.join(other)} already hold{'s' if len(other) == 1 else ''} another "
                f"dataset (a different {MANIFEST}); nothing was uploaded. Use --replace to "
                "remove that dataset's manifest and upload this one"
            )
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
        )
        uploads = [_Mirror(t, dataset, files, progress, verify) for t in transports]
        failures: dict[str, str] = {}
        lock = threading.Lock()

        def run(job: _Mirror, held: bytes | None) -> None:
            try:
                job.upload(manifest_bytes, held)
            except (UserError, OSError, EOFError, paramiko.SSHException, *all_errors) as exc:
                with lock:
                    failures[job.t.label] = failure_reason(exc)

        with progress, ThreadPoolExecutor(len(uploads)) as pool:
            list(pool.map(run, uploads, remote))
    finally:
        for t in transports:
            t.close()
    if failures:
        done = len(uploads) - len(failures)
        raise UserError(
            "upload failed on "
            + "; ".join(f"{label}: {why}" for label, why in failures.items())
            + f" ({done} other mirror(s) complete). Run the same command again to resume"
        )
    return [job.result for job in uploads]


def _held_manifest(t: Transport) -> bytes | None:
    try:
        return t.read(MANIFEST)
    except (OSError, EOFError, paramiko.SSHException, *all_errors) as exc:
        raise UserError(
            f"mirror {t.label}: cannot read {MANIFEST}: {failure_reason(exc)}"
        ) from None


def report(results: list[MirrorUpload], console: Console) -> None:
    """One line per mirror: what was sent and what was already there."""
    for r in results:
        resumed = f", {r.resumed_bytes} resumed" if r.resumed_bytes else ""
        replaced = ", old dataset's manifest removed first" if r.replaced else ""
        console.print(
            f"{escape(r.label)}: {r.sent_files} file(s) sent ({r.sent_bytes} bytes{resumed}), "
            f"{r.kept_files} already in place{replaced}",
            soft_wrap=True,
            highlight=False,
        )
