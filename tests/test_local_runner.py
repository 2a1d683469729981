"""DAG semantics of the local runner: ordering, VARS, retries, scripts, FINAL, throttles."""

from __future__ import annotations

from pathlib import Path

from test_local_runner_helpers import dag, job, script

from pipeline.local_runner import REMOVED_RETURN, NodeEvent, run_dag


def test_diamond_runs_parents_before_children(tmp_path: Path) -> None:
    order = tmp_path / "order.txt"
    for name in "ABCD":
        job(tmp_path, name, f"echo {name} >> {order}")
    path = dag(tmp_path, "JOB A A.sub\nJOB B B.sub\nJOB C C.sub\nJOB D D.sub\n"
               "PARENT A CHILD B C\nPARENT B C CHILD D\n")  # fmt: skip
    events: list[NodeEvent] = []
    result = run_dag(path, slots=2, on_event=events.append)
    assert result.ok and result.exit_code == 0 and result.done == ["A", "B", "C", "D"]
    lines = order.read_text().split()
    assert lines[0] == "A" and lines[-1] == "D" and sorted(lines[1:3]) == ["B", "C"]
    kinds = [e.kind for e in events if e.node == "A"]
    assert kinds == ["submitted", "running", "done"]
    assert not (tmp_path / ".local_runner" / "test.dag.journal").exists()


def test_vars_expand_with_dagman_escaping(tmp_path: Path) -> None:
    out = tmp_path / "args.txt"
    job(tmp_path, "A", f'for a in "$@"; do echo "[$a]" >> {out}; done',
        submit='arguments = "\'$(first)\' $(second) \'$(JOB_NAME)\'"')  # fmt: skip
    path = dag(tmp_path, 'JOB A A.sub\nVARS A first="say \\"hi\\" \\\\o/" second="two"\n'
               'VARS A JOB_NAME="node-$(JOB)"\n')  # fmt: skip
    assert run_dag(path, slots=1).ok
    assert out.read_text().splitlines() == ['[say "hi" \\o/]', "[two]", "[node-A]"]


def test_retry_counts_and_unless_exit(tmp_path: Path) -> None:
    count = tmp_path / "count"
    job(tmp_path, "A", f"echo x >> {count}; exit 3")
    job(tmp_path, "B", f"echo x >> {count}.b; exit 78")
    path = dag(tmp_path, "JOB A A.sub\nJOB B B.sub\nRETRY A 2\nRETRY B 5 UNLESS-EXIT 78\n")
    events: list[NodeEvent] = []
    result = run_dag(path, slots=2, on_event=events.append)
    assert not result.ok and result.failed == ["A", "B"] and result.exit_code == 1
    assert len(count.read_text().split()) == 3
    assert len((tmp_path / "count.b").read_text().split()) == 1
    assert [e.attempt for e in events if e.node == "A" and e.kind == "retry"] == [0, 1]
    assert result.rescue_file == tmp_path / "test.dag.rescue001"


def test_post_script_turns_last_failure_into_success(tmp_path: Path) -> None:
    seen = tmp_path / "post.txt"
    job(tmp_path, "A", "exit 5")
    post = script(tmp_path, "post.sh", f'echo "$1 $2 $3 $4" >> {seen}\n'
                  '[ "$2" -lt "$3" ] && exit "$1"; exit 0')  # fmt: skip
    path = dag(tmp_path, f"JOB A A.sub\nRETRY A 2\nSCRIPT POST A {post} $RETURN $RETRY "
               "$MAX_RETRIES $JOB\n")  # fmt: skip
    result = run_dag(path, slots=1)
    assert result.ok
    assert seen.read_text().splitlines() == ["5 0 2 A", "5 1 2 A", "5 2 2 A"]


def test_pre_skip_marks_node_done_without_job(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    job(tmp_path, "A", f"touch {ran}")
    pre = script(tmp_path, "pre.sh", "exit 42")
    path = dag(tmp_path, f"JOB A A.sub\nSCRIPT PRE A {pre}\nPRE_SKIP A 42\n")
    assert run_dag(path, slots=1).ok
    assert not ran.exists()


def test_final_runs_after_failure_with_dag_status(tmp_path: Path) -> None:
    seen = tmp_path / "final.txt"
    job(tmp_path, "A", "exit 1")
    job(tmp_path, "B", "exit 0")
    job(
        tmp_path,
        "F",
        f'echo "$1 $2" > {seen}',
        submit='arguments = "$(DAG_STATUS) $(FAILED_COUNT)"',
    )
    path = dag(tmp_path, "JOB A A.sub\nJOB B B.sub\nPARENT A CHILD B\nFINAL F F.sub\n")
    result = run_dag(path, slots=1)
    assert seen.read_text().split() == ["2", "1"]
    # The FINAL node's success decides the DAG's (DAGMan manual, FINAL node).
    assert result.ok and result.dag_status == 2 and result.futile == ["B"]


def test_abort_dag_on_stops_and_returns_value(tmp_path: Path) -> None:
    job(tmp_path, "A", "exit 9")
    job(tmp_path, "B", "exit 0")
    path = dag(tmp_path, "JOB A A.sub\nJOB B B.sub\nPARENT A CHILD B\nRETRY A 3\n"
               "ABORT-DAG-ON A 9 RETURN 4\n")  # fmt: skip
    events: list[NodeEvent] = []
    result = run_dag(path, slots=1, on_event=events.append)
    assert not result.ok and result.exit_code == 4 and result.dag_status == 3
    assert not [e for e in events if e.kind == "retry"]


def _max_overlap(stamps: Path) -> int:
    spans = [tuple(map(float, line.split())) for line in stamps.read_text().splitlines()]
    return max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)


def _timed(directory: Path, name: str, stamps: Path) -> str:
    return job(
        directory, name, f's=$(date +%s.%N); sleep 0.4; echo "$s $(date +%s.%N)" >> {stamps}'
    )


def test_maxjobs_and_slots_limit_concurrency(tmp_path: Path) -> None:
    stamps = tmp_path / "cat.txt"
    lines = [f"JOB {n} {_timed(tmp_path, n, stamps)}\nCATEGORY {n} heavy\n" for n in "ABCD"]
    path = dag(tmp_path, "".join(lines) + "MAXJOBS heavy 1\n")
    assert run_dag(path, slots=4).ok
    assert _max_overlap(stamps) == 1
    stamps2 = tmp_path / "slots.txt"
    lines = [f"JOB {n} {_timed(tmp_path, n + 'x', stamps2)}\n" for n in "ABCD"]
    path = dag(tmp_path, "".join(lines), name="slots.dag")
    assert run_dag(path, slots=2).ok
    assert _max_overlap(stamps2) == 2


def test_priority_orders_ready_nodes(tmp_path: Path) -> None:
    order = tmp_path / "order.txt"
    for name in "ABC":
        job(tmp_path, name, f"echo {name} >> {order}")
    path = dag(tmp_path, "JOB A A.sub\nJOB B B.sub\nJOB C C.sub\nPRIORITY C 10\nPRIORITY B 5\n")
    assert run_dag(path, slots=1).ok
    assert order.read_text().split() == ["C", "B", "A"]


def test_periodic_remove_kills_a_sleeping_job(tmp_path: Path) -> None:
    seen = tmp_path / "post.txt"
    job(tmp_path, "A", "sleep 30",
        submit="periodic_remove = JobStatus == 2 && time() - JobCurrentStartDate >= 1")  # fmt: skip
    post = script(tmp_path, "post.sh", f"echo $1 > {seen}; exit 0")
    path = dag(tmp_path, f"JOB A A.sub\nSCRIPT POST A {post} $RETURN\n")
    events: list[NodeEvent] = []
    result = run_dag(path, slots=1, on_event=events.append)
    assert result.ok and seen.read_text().strip() == str(REMOVED_RETURN)
    assert "removed" in [e.kind for e in events]
    times = [e.time for e in events if e.node == "A"]
    assert times[-1] - times[0] < 6


def test_allowed_job_duration_holds_then_removes(tmp_path: Path) -> None:
    job(tmp_path, "A", "sleep 30",
        submit="allowed_job_duration = 1\nperiodic_remove = JobStatus == 5 && HoldReasonCode == 46")  # fmt: skip
    result = run_dag(dag(tmp_path, "JOB A A.sub\n"), slots=1)
    assert result.failed == ["A"]
    text = (tmp_path / "A.log").read_text()
    assert "Code 46" in text and "Job was aborted" in text


def test_local_universe_runs_in_initialdir_with_temporary_files_elsewhere(tmp_path: Path) -> None:
    """As on a pool: no thread variables, and TMPDIR is a scratch directory that goes away."""
    (tmp_path / "work").mkdir()
    job(tmp_path, "A", 'pwd > where.txt; echo "${OMP_NUM_THREADS-unset} $TMPDIR" >> where.txt\n'
        'touch "$TMPDIR/cache"', submit="initialdir = work\nrequest_cpus = 3", universe="local")  # fmt: skip
    assert run_dag(dag(tmp_path, "JOB A A.sub\n"), slots=1).ok
    where, threads, tmpdir = (tmp_path / "work" / "where.txt").read_text().split()
    assert Path(where) == tmp_path / "work" and threads == "unset"
    assert Path(tmpdir).parent == tmp_path / ".local_runner" / "sandbox"
    assert not Path(tmpdir).exists()
    assert not (tmp_path / "work" / "cache").exists()
