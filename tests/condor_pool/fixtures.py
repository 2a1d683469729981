"""Pytest plugin: the ``pool`` marker and a session-wide personal HTCondor pool.

Tests marked ``pool`` are skipped, with the reason, where the pool cannot be provisioned; under
CI (``CI`` set) they fail instead, because the project does not accept skipped pool tests there.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.condor_pool.pool import CondorPool, PoolError, provision, reason_unavailable

REPO = Path(__file__).resolve().parents[2]
WORK_BASE = Path(os.environ.get("DAGTRAIN_CONDOR_WORK", "/var/tmp/dagtrain-condor-pool"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "pool: runs real DAGs on the personal HTCondor pool (tests/condor_pool)"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("pool") is not None:
        _require_pool()


@functools.cache
def _unavailable() -> str | None:
    """Why no pool can be had here; provisions the root (once per session) if it can."""
    reason = reason_unavailable()
    if reason is None:
        try:
            provision()
        except PoolError as error:
            reason = str(error)
    return reason


def _require_pool() -> None:
    reason = _unavailable()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"condor pool unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"condor pool unavailable: {reason}")


@pytest.fixture(scope="session")
def condor_pool_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """The session's directory shared with the pool (bound at the same path inside the root).

    Not under /tmp: DAGMan's default strictness aborts a DAG whose node log is in /tmp.
    Kept after a session with failures, for the DAGMan and job logs.
    """
    WORK_BASE.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="session-", dir=WORK_BASE))
    yield path
    if request.session.testsfailed == 0:
        shutil.rmtree(path)


@pytest.fixture(scope="session")
def condor_pool(condor_pool_dir: Path) -> Iterator[CondorPool]:
    """A running pool whose jobs see the Python installation, the venv, the repository (the
    venv's editable install imports from it: `python -m pipeline.cli` runs inside the root)
    and condor_pool_dir."""
    _require_pool()
    pool = CondorPool()
    pool.own(condor_pool_dir)
    pool.start([Path(sys.base_prefix), Path(sys.prefix), REPO, condor_pool_dir])
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture
def condor_workdir(
    condor_pool: CondorPool, condor_pool_dir: Path, request: pytest.FixtureRequest
) -> Path:
    """A directory of condor_pool_dir for one test, writable by jobs and DAGMan."""
    path = condor_pool_dir / request.node.name
    path.mkdir()
    condor_pool.own(path)
    return path
