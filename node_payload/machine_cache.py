"""The execute machine's cache: what a node job keeps for the jobs after it on the same machine.

Three kinds live there: a lane's error-feedback residual (residual_cache.py), the run's last
global models (model_cache.py), so that the next job can fetch only a delta, and job payloads,
so that a job gets only the payload's launcher (pipeline/payload_launcher.py). Its root is
`[data] node_cache`, or, when that is empty, /var/tmp/dagtrain-UID (never $TMPDIR: HTCondor
points it at the job's scratch folder, deleted with the job). Each kind has a folder there,
private to this user; one that is not (a link, another user's) is named in one warning line
and not used, and what it would hold is then fetched or started afresh. A volunteer's machine
serves many runs over months: a run's folder or a payload that no job has used for STALE_DAYS
is removed by the next job that opens its kind's folder, so that finished runs do not leave
their models and residuals on the machine for good.

Standard library only, and importing nothing of dagtrain: the payload's launcher carries this
very file, since it runs before the payload is on the machine.
"""

import contextlib
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

DEFAULT_PARENT = Path("/var/tmp")
STALE_DAYS = 30


def cache_root(node_cache: str) -> Path:
    """The machine cache's root for a run's `[data] node_cache`."""
    if node_cache:
        return Path(node_cache).expanduser()
    return DEFAULT_PARENT / f"dagtrain-{os.getuid()}"


def run_key(run_id: str) -> str:
    """A run's folder name in a kind's folder."""
    return hashlib.sha256(run_id.encode()).hexdigest()[:16]


def private_folder(node_cache: str, kind: str, without: str) -> Path | None:
    """The folder of a kind of file (`residuals`, `models`, `payloads`) in the machine cache,
    created private to this user; None, after one warning line ending in `without` (what the
    job does instead), when the machine gives none."""
    root = cache_root(node_cache) / kind
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = os.lstat(root)
    except OSError as exc:
        print(f"warning: machine cache {root}: {exc}; {without}", file=sys.stderr)
        return None
    if not root.is_dir() or root.is_symlink() or status.st_uid != os.getuid():
        print(
            f"warning: machine cache {root} is not a folder of this user's; {without}",
            file=sys.stderr,
        )
        return None
    _drop_stale(root)
    return root


def run_folder(node_cache: str, kind: str, run_id: str, without: str) -> Path | None:
    """A run's folder in a kind's folder, marked as used now; None as private_folder says."""
    root = private_folder(node_cache, kind, without)
    if root is None:
        return None
    folder = root / run_key(run_id)
    folder.mkdir(mode=0o700, exist_ok=True)
    used(folder)
    return folder


def used(path: Path) -> None:
    """Mark an entry as in use, so that no job removes it as stale."""
    with contextlib.suppress(OSError):  # removed meanwhile: it is written again or fetched
        os.utime(path)


def _drop_stale(root: Path) -> None:
    """Remove the entries of a kind's folder that no job has used for STALE_DAYS; one another
    job removes or writes meanwhile is left to it."""
    limit = time.time() - STALE_DAYS * 86400
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= limit:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
