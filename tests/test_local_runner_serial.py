"""Serial runs (`run_dag(serial=True)`, `dagtrain run --serial`): one node at a time, whole, in
an order that depends only on the DAG and its finished nodes, so that a resumed run takes the
path of an uninterrupted one (what makes an asynchronous run's models reproducible)."""

from __future__ import annotations

from pathlib import Path

from test_local_runner_helpers import dag, job, script

from pipeline.local_runner import run_dag

# Two lanes written lane by lane, as the asynchronous DAG is; B0's job fails on its first try.
LANES = """JOB A0 A0.sub
JOB A1 A1.sub
JOB B0 B0.sub
JOB B1 B1.sub
PARENT A0 CHILD A1
PARENT B0 CHILD B1
RETRY B0 1
"""
SCRIPTS = "SCRIPT PRE {n} pre.sh {n}\nSCRIPT POST {n} post.sh {n} $RETURN\n"


def _lanes(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "log.txt"
    for name in ("A0", "A1", "B1"):
        job(tmp_path, name, f"echo job {name} >> {log}")
    flag = tmp_path / "failed_once"
    job(tmp_path, "B0", f"echo job B0 >> {log}; test -e {flag} || {{ touch {flag}; exit 3; }}")
    script(tmp_path, "pre.sh", f'sleep 0.2; echo pre "$1" >> {log}')
    script(tmp_path, "post.sh", f'echo post "$1" >> {log}; exit "$2"')
    text = LANES + "".join(SCRIPTS.format(n=n) for n in ("A0", "A1", "B0", "B1"))
    return dag(tmp_path, text), log


def _turn(name: str) -> list[str]:
    return [f"pre {name}", f"job {name}", f"post {name}"]


def test_one_node_at_a_time_layer_by_layer_retries_in_their_turn(tmp_path: Path) -> None:
    path, log = _lanes(tmp_path)
    assert run_dag(path, slots=2, serial=True).ok
    expected = _turn("A0") + _turn("B0") + _turn("B0") + _turn("A1") + _turn("B1")
    assert log.read_text().splitlines() == expected


def test_a_resumed_serial_run_takes_the_uninterrupted_path(tmp_path: Path) -> None:
    """Only the finished nodes are known after a kill: A0 done, so B0 (layer 0) comes before
    A1, as in the uninterrupted run, although A1 comes first in the DAG file."""
    path, log = _lanes(tmp_path)
    journal = tmp_path / ".local_runner" / "test.dag.journal"
    journal.parent.mkdir()
    journal.write_text("DONE A0\n")
    assert run_dag(path, slots=1, serial=True).ok
    expected = _turn("B0") + _turn("B0") + _turn("A1") + _turn("B1")
    assert log.read_text().splitlines() == expected
