"""How long the real condor_submit_dag and DAGMan take to take in a planned 1,000 x 100 DAG.

A run is planned (1,000 nodes x 100 rounds by default), then submitted with condor_submit_dag on
the test pool (tests/condor_pool: HTCondor 23.9, needs root; the pool is built on first use).
Measured: condor_submit_dag's own wall time, then from DAGMan's dagman.out: its start to the
end of parsing ("Dag contains N total jobs") and to its first node job submitted. The DAG is
removed as soon as its first job is submitted; nothing trains. The same shape written by
htcondor2.dags (as in bench_planner.py) is taken in the same way, after it, as the reference.

Run (as root, from the repository):  python benchmarks/bench_dagman_start.py [NODES ROUNDS]
"""

import re
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from htcondor2 import dags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pool harness lives in the test suite, not in the package

from bench_planner import plan_tiny, reference_dag  # noqa: E402  (this folder is on sys.path)

from node_payload.common.run_config import read_run_config  # noqa: E402
from node_payload.common.run_layout import CONFIG_FILE, DAG_FILE  # noqa: E402
from pipeline.planner import write  # noqa: E402
from tests.condor_pool.fixtures import WORK_BASE  # noqa: E402
from tests.condor_pool.pool import CondorPool, provision, reason_unavailable  # noqa: E402

_STAMP = r"^(\d\d/\d\d/\d\d \d\d:\d\d:\d\d) "
_MARKS = {
    "start": re.compile(_STAMP + r".*\(CONDOR_DAGMAN\) STARTING UP", re.M),
    "parsed": re.compile(_STAMP + r"Dag contains (\d+) total jobs", re.M),
    "first job": re.compile(_STAMP + r"Submitting HTCondor Node \S+ job", re.M),
}


def _plan(work: Path, nodes: int, rounds: int) -> Path:
    python = {"python": sys.executable, "submit_python": sys.executable}
    return write(plan_tiny(work, nodes, rounds, python), work / "run")


def _stamps(out: Path, timeout_s: float) -> dict[str, datetime]:
    """dagman.out's time of each mark, once its first node job is submitted."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = out.read_text(errors="replace") if out.is_file() else ""
        found = {name: mark.search(text) for name, mark in _MARKS.items()}
        if all(found.values()):
            return {
                name: datetime.strptime(match.group(1), "%m/%d/%y %H:%M:%S")
                for name, match in found.items()
                if match
            }
        if "EXITING WITH STATUS" in text:
            raise RuntimeError(f"DAGMan exited before submitting a job; see {out}")
        time.sleep(0.2)
    raise RuntimeError(f"no node job submitted after {timeout_s} s; see {out}")


def _take_in(pool: CondorPool, dag: Path) -> dict[str, float]:
    """Submit `dag`, wait for its first node job, remove it; the figures in seconds."""
    started = time.perf_counter()
    done = pool.run(["condor_submit_dag", dag.name], cwd=dag.parent, timeout_s=1800)
    submitted = time.perf_counter() - started
    cluster = re.search(r"submitted to cluster (\d+)", done.stdout)
    if done.returncode or not cluster:
        raise RuntimeError(f"condor_submit_dag failed:\n{done.stdout}\n{done.stderr}")
    stamps = _stamps(dag.with_name(dag.name + ".dagman.out"), timeout_s=1800)
    first_job = time.perf_counter() - started
    pool.run(["condor_rm", cluster.group(1)], cwd=dag.parent)
    return {
        "condor_submit_dag": submitted,
        "parsed": (stamps["parsed"] - stamps["start"]).total_seconds(),
        "first job": (stamps["first job"] - stamps["start"]).total_seconds(),
        "call to first job": first_job,
        "MB": dag.stat().st_size / 1e6,
    }


def main() -> None:
    nodes, rounds = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) == 3 else (1000, 100)
    unavailable = reason_unavailable()
    if unavailable:
        sys.exit(f"the test pool cannot run here: {unavailable}")
    provision()
    WORK_BASE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-dagman-", dir=WORK_BASE))
    pool = CondorPool()
    try:
        run_dir = _plan(work, nodes, rounds)
        reference = work / "htcondor2.dags"
        reference.mkdir()
        (reference / "rounds/r000").mkdir(parents=True)  # its first layer's initialdir
        # its DAG file and its layers' submit files
        dags.write_dag(reference_dag(read_run_config(run_dir / CONFIG_FILE)), reference, DAG_FILE)
        pool.own(work)
        pool.start([Path(sys.base_prefix), Path(sys.prefix), REPO, work])
        version = pool.run(["condor_version"], cwd=work).stdout.split("\n")[0]
        figures = {
            "dagtrain": _take_in(pool, run_dir / DAG_FILE),
            "htcondor2.dags": _take_in(pool, reference / DAG_FILE),
        }
    finally:
        pool.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{nodes} nodes x {rounds} rounds; {version}")
    for name, got in figures.items():
        print(
            f"{name:>15}: DAG file {got['MB']:.1f} MB; condor_submit_dag "
            f"{got['condor_submit_dag']:.1f} s; DAGMan start -> parsed {got['parsed']:.0f} s, "
            f"-> first node job submitted {got['first job']:.0f} s; condor_submit_dag called -> "
            f"first job submitted {got['call to first job']:.1f} s"
        )


if __name__ == "__main__":
    main()
