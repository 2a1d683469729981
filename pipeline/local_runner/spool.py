"""A self-checkpointing job's spool: where the access point keeps its last checkpoint.

When a job exits with its `checkpoint_exit_code`, a pool copies its `transfer_checkpoint_files`
(without that command: its output files) from the sandbox to the schedd's SPOOL, replacing the
checkpoint before, and restarts it; a job evicted later gets them back beside its input files on
the next machine it runs on (HTCondor manual, "Self-Checkpointing Applications"). The local
runner keeps one spool folder per job cluster, dropped when the job leaves the queue.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .sandbox import STARTER_FILES
from .submit_description import JobSpec


def _checkpoint_names(spec: JobSpec, sandbox: Path) -> list[str]:
    if spec.transfer_checkpoint_files is not None:
        return spec.transfer_checkpoint_files
    if spec.transfer_output_files is not None:
        return spec.transfer_output_files
    return sorted(p.name for p in sandbox.iterdir() if p.name not in STARTER_FILES)


def save_checkpoint(spec: JobSpec, sandbox: Path, spool: Path) -> list[str]:
    """Replace the spool's checkpoint with the sandbox's; the names missing (nothing saved)."""
    names = _checkpoint_names(spec, sandbox)
    missing = [name for name in names if not (sandbox / name).exists()]
    if missing:
        return missing
    incoming = spool.with_name(spool.name + ".new")
    shutil.rmtree(incoming, ignore_errors=True)
    incoming.mkdir(parents=True)
    for name in names:
        source, target = sandbox / name, incoming / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    shutil.rmtree(spool, ignore_errors=True)
    incoming.rename(spool)
    return []


def restore_checkpoint(spool: Path, sandbox: Path) -> None:
    """Put the spool's checkpoint, if any, in a new sandbox beside the job's inputs."""
    if spool.is_dir():
        shutil.copytree(spool, sandbox, dirs_exist_ok=True)
