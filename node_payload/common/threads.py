"""How many threads a job may use: what the slot granted, as HTCondor's starter reports it."""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch


def _request_cpus_from_job_ad() -> int | None:
    ad_path = os.environ.get("_CONDOR_JOB_AD")
    if not ad_path or not Path(ad_path).is_file():
        return None
    for line in Path(ad_path).read_text(errors="replace").splitlines():
        name, _, value = line.partition("=")
        if name.strip().lower() == "requestcpus":
            try:
                return max(1, int(float(value.strip())))
            except ValueError:
                return None
    return None


def job_threads() -> int:
    """RequestCpus from the job ad, else OMP_NUM_THREADS (which the starter also sets), else 1."""
    from_ad = _request_cpus_from_job_ad()
    if from_ad:
        return from_ad
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads for a call made in-process (0: leave torch's default), given
    back after it so the caller's own setting is untouched."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
