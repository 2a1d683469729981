"""The execute machine's cache: what a node job keeps for the jobs after it on the same machine.

Three kinds live there: a lane's error-feedback residual (residual_cache.py), the run's last
global models (model_cache.py), so that the next job can fetch only a delta, and job payloads,
so that a job gets only the payload's launcher (pipeline/payload_launcher.py). Its root is
`[data] node_cache`, or, when that is empty, /var/tmp/dagtrain-UID (never $TMPDIR: HTCondor
points it at the job's scratch folder, deleted with the job). Each kind has a folder there,
private to this user; one that is not (a link, another user's) is named in one warning line
and not used, and what it would hold is then fetched or started afresh.

Standard library only, and importing nothing of dagtrain: the payload's launcher carries this
very file, since it runs before the payload is on the machine.
"""

import hashlib
import os
import sys
from pathlib import Path

DEFAULT_PARENT = Path("/var/tmp")


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
    return root
