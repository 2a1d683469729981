"""Builders for tiny DAGs of /bin/sh jobs used by the local runner tests."""

from __future__ import annotations

from pathlib import Path


def job(
    directory: Path, name: str, script: str, submit: str = "", universe: str = "vanilla"
) -> str:
    """Write `<name>.sh` and `<name>.sub`; returns the submit file name for a JOB line."""
    exe = directory / f"{name}.sh"
    exe.write_text("#!/bin/sh\n" + script + "\n")
    exe.chmod(0o755)
    (directory / f"{name}.sub").write_text(
        f"universe = {universe}\nexecutable = {name}.sh\nshould_transfer_files = YES\n"
        f"log = {name}.log\noutput = {name}.out\nerror = {name}.err\n{submit}\nqueue\n"
    )
    return f"{name}.sub"


def dag(directory: Path, text: str, name: str = "test.dag") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def script(directory: Path, name: str, body: str) -> str:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return name
