"""The run's last global models on the execute machine, so the next job there fetches a delta.

A job that got version v (whole, or by delta, always checked against its pointer's sha256)
keeps it in the machine cache (node_payload/machine_cache.py) as models/RUN/global_rNNN.
safetensors, and the versions before v-1 go. The next job on the machine, given the pointer of
v+1 with a delta from v, reads v from there. A cached file is believed only by its sha256: one
that is not the version the delta applies to is named in one line, removed, and the model is
fetched whole.
"""

import hashlib
import re
from pathlib import Path

from node_payload import machine_cache
from node_payload.common.atomic_file import replacing
from node_payload.common.run_layout import global_model_name, round_tag

MODELS = "models"
_NAME = re.compile(r"global_r(\d{3,})\.safetensors")


def run_folder(node_cache: str, run_id: str) -> Path | None:
    """This run's model folder on this machine; None (after one warning line) when there is
    none: every job then fetches its model whole."""
    return machine_cache.run_folder(node_cache, MODELS, run_id, "every model is fetched whole")


def cached(folder: Path | None, version: int, sha256: str) -> tuple[bytes | None, str]:
    """The cached file of `version` if its sha256 is `sha256`; else None and why not."""
    path = folder / global_model_name(round_tag(version)) if folder else None
    if path is None or not path.is_file():
        return None, f"version {version} is not in this machine's cache"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"the cached version {version} is unreadable ({exc.strerror})"
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        path.unlink(missing_ok=True)
        return None, (
            f"the cached version {version} has sha256 {digest[:12]}..., not the pointer's "
            f"{sha256[:12]}... (removed)"
        )
    return data, ""


def keep(folder: Path | None, version: int, data: bytes) -> None:
    """Keep a checked model for the jobs after this one; versions before version - 1 go."""
    if folder is None:
        return
    with replacing(folder / global_model_name(round_tag(version))) as tmp:
        tmp.write_bytes(data)
    for path in folder.iterdir():
        match = _NAME.fullmatch(path.name)
        if match and int(match[1]) < version - 1:
            path.unlink(missing_ok=True)
