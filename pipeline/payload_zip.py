"""The job payload as one file, so execute nodes need Python with torch but not dagtrain; and,
when the mirrors serve the run's models, the launcher node jobs get instead of it
(pipeline/payload_launcher.py)."""

import hashlib
import io
import json
import zipfile
from pathlib import Path

import aggregation
import node_payload
from aggregation.publish import publish_payload
from node_payload import machine_cache
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import PAYLOAD_DIR, PAYLOAD_NAME, published_payload_path
from pipeline import payload_launcher

LAUNCHER_DIR = "launcher"
LAUNCHER = f"{PAYLOAD_DIR}/{LAUNCHER_DIR}/{PAYLOAD_NAME}"  # in the run directory
_FIXED_TIME = (2020, 1, 1, 0, 0, 0)  # fixed timestamps: the same sources give the same bytes

_MAIN = """import sys

from aggregation.job_commands import main

sys.exit(main(sys.argv[1:]))
"""


def _sources() -> list[tuple[str, Path]]:
    files = []
    for package in (node_payload, aggregation):
        root = Path(package.__file__).parent
        files += [
            (p.relative_to(root.parent).as_posix(), p)
            for p in sorted(root.rglob("*.py"))
            if "__pycache__" not in p.parts
        ]
    return files


def _zip_app(files: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    buffer.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for arcname, data in files:
            info = zipfile.ZipInfo(arcname, _FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return buffer.getvalue()


def build_payload() -> bytes:
    sources = [(arcname, path.read_bytes()) for arcname, path in _sources()]
    return _zip_app([("__main__.py", _MAIN.encode()), *sources])


def build_launcher(payload: bytes, run_id: str, mirrors: list[int]) -> bytes:
    """The launcher of `payload`, published at its place for the run on the given mirrors."""
    spec = {
        "sha256": hashlib.sha256(payload).hexdigest(),
        "bytes": len(payload),
        "path": published_payload_path(run_id),
        "mirrors": mirrors,
    }
    return _zip_app(
        [
            ("__main__.py", Path(payload_launcher.__file__).read_bytes()),
            ("machine_cache.py", Path(machine_cache.__file__).read_bytes()),
            (payload_launcher.SPEC, json.dumps(spec).encode()),
        ]
    )


def write_payload(directory: Path) -> Path:
    path = directory / PAYLOAD_NAME
    path.write_bytes(build_payload())
    path.chmod(0o755)
    return path


def write_launcher(directory: Path, config: RunConfig) -> None:
    """When the mirrors serve the run's models: publish the payload in `directory` and write
    its launcher, directory/launcher/dagtrain.pyz, which the node jobs get instead."""
    if not config.models_from_mirrors:
        return
    path = directory / PAYLOAD_NAME
    holding = publish_payload(config, path)
    launcher = directory / LAUNCHER_DIR / PAYLOAD_NAME
    launcher.parent.mkdir()
    launcher.write_bytes(build_launcher(path.read_bytes(), config.run.run_id, holding))
