"""Replacing a file in one step, for every file of a run that something else may read meanwhile.

Readers (a DAGMan retry, a resumed run, a status monitor, the next job) see the old file or the
new one, never half of one, and a crash after the rename cannot bring the old one back.
Standard library only: POST scripts and the local runner use it without torch.
"""

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for the body to write; once the body returns, the file is
    synced to disk and renamed over `path`, and the rename synced; if the body fails, the
    temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text`, atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def _fsync(path: Path) -> None:
    """Sync a file's data, or a folder's entries (the rename itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
