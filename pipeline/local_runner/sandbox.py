"""HTCondor file-transfer semantics between initialdir and a scratch directory.

Copying (never linking) keeps a job from touching its inputs in place, which is exactly the
mistake that would go unnoticed locally and break on a pool without a shared file system.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from node_payload.common.errors import UserError

from .submit_description import JobSpec

# Files the starter itself puts in the scratch directory; never part of the output sandbox.
STARTER_FILES = ("_condor_stdout", "_condor_stderr", ".job.ad", ".machine.ad")


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def stage_in(spec: JobSpec, sandbox: Path) -> dict[str, float]:
    """Copy the input sandbox; returns top-level name -> mtime to detect new/modified outputs.

    A directory listed with a trailing slash transfers its contents, without one the directory
    itself; every item lands in the flat top level under its base name.
    """
    sandbox.mkdir(parents=True)
    items = list(spec.transfer_input_files)
    if spec.transfer_executable:
        items.append(str(spec.executable))
    for item in items:
        if "://" in item:
            raise UserError(f"{spec.submit_file}: URL input {item!r} is not supported locally")
        src = spec.initialdir / item if item != str(spec.executable) else spec.executable
        if not src.exists():
            raise FileNotFoundError(f"{src} does not exist")  # a pool holds such a job
        if src.is_dir() and item.endswith("/"):
            for child in src.iterdir():
                _copy(child, sandbox / child.name)
        else:
            _copy(src, sandbox / src.name)
    return {p.name: p.stat().st_mtime for p in sandbox.iterdir()}


def command_path(spec: JobSpec, sandbox: Path | None) -> str:
    """What the starter would exec: the transferred copy, or the executable in place."""
    if sandbox is not None and spec.transfer_executable:
        copied = sandbox / spec.executable.name
        copied.chmod(copied.stat().st_mode | 0o111)
        return str(copied)
    return str(spec.executable)


def should_transfer_output(spec: JobSpec, exit_code: int | None) -> bool:
    """ON_SUCCESS transfers only when the job exits with success_exit_code; a signal is no exit."""
    if spec.when_to_transfer_output == "ON_SUCCESS":
        return exit_code == spec.success_exit_code
    return exit_code is not None


def stage_out(spec: JobSpec, sandbox: Path, inputs: dict[str, float]) -> list[str]:
    """Copy outputs back to initialdir (base names, then remaps); return listed outputs missing."""
    if spec.transfer_output_files is None:
        names = [
            p.name
            for p in sandbox.iterdir()
            if p.is_file()
            and p.name not in STARTER_FILES
            and inputs.get(p.name) != p.stat().st_mtime
        ]
    else:
        names = list(spec.transfer_output_files)
    missing = [name for name in names if not (sandbox / name).exists()]
    if missing:
        return missing
    for name in names:
        base = os.path.basename(name.rstrip("/"))
        target = spec.transfer_output_remaps.get(name, spec.transfer_output_remaps.get(base, base))
        _copy(sandbox / name, spec.initialdir / target)
    return []
