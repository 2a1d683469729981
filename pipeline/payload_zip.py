"""The job payload as one file, so execute nodes need Python with torch but not dagtrain."""

import io
import zipfile
from pathlib import Path

import aggregation
import node_payload

PAYLOAD_NAME = "dagtrain.pyz"
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


def build_payload() -> bytes:
    buffer = io.BytesIO()
    buffer.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo("__main__.py", _FIXED_TIME), _MAIN)
        for arcname, path in _sources():
            info = zipfile.ZipInfo(arcname, _FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def write_payload(directory: Path) -> Path:
    path = directory / PAYLOAD_NAME
    path.write_bytes(build_payload())
    path.chmod(0o755)
    return path
