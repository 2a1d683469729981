"""File transfer, job environment, user log and node status file of the local runner."""

from __future__ import annotations

from pathlib import Path

import classad2
import htcondor2
from test_local_runner_helpers import dag, job

from pipeline.local_runner import run_dag


def test_transfer_inputs_outputs_remaps_and_directories(tmp_path: Path) -> None:
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "sub" / "x.txt").write_text("x")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "y.txt").write_text("y")
    (tmp_path / "in.txt").write_text("hello")
    (tmp_path / "results").mkdir()
    body = (
        "test -f in.txt && test -f data/sub/x.txt && test -f y.txt && test ! -e flat || exit 9\n"
        "cat in.txt > out.txt; mkdir -p outdir/deep; echo d > outdir/deep/f; echo r > renamed"
    )
    job(tmp_path, "A", body, submit=(
        "transfer_input_files = in.txt, data, flat/\n"
        "transfer_output_files = out.txt, outdir, renamed\n"
        'transfer_output_remaps = "renamed = results/final.txt"\n'
        "when_to_transfer_output = ON_EXIT"))  # fmt: skip
    assert run_dag(dag(tmp_path, "JOB A A.sub\n"), slots=1).ok
    assert (tmp_path / "out.txt").read_text() == "hello"
    assert (tmp_path / "outdir" / "deep" / "f").read_text() == "d\n"
    assert (tmp_path / "results" / "final.txt").read_text() == "r\n"
    assert not (tmp_path / "renamed").exists()
    assert not list((tmp_path / ".local_runner" / "sandbox").iterdir())


def test_on_success_does_not_transfer_after_failure(tmp_path: Path) -> None:
    job(tmp_path, "A", "echo partial > out.txt; echo oops >&2; exit 3", submit=(
        "transfer_output_files = out.txt\nwhen_to_transfer_output = ON_SUCCESS"))  # fmt: skip
    result = run_dag(dag(tmp_path, "JOB A A.sub\n"), slots=1)
    assert result.failed == ["A"]
    assert not (tmp_path / "out.txt").exists()
    assert (tmp_path / "A.err").read_text() == "oops\n"


def test_missing_output_holds_and_fails_the_node(tmp_path: Path) -> None:
    job(tmp_path, "A", "exit 0", submit="transfer_output_files = never.txt")
    result = run_dag(dag(tmp_path, "JOB A A.sub\n"), slots=1)
    assert result.failed == ["A"]
    events = list(htcondor2.JobEventLog(str(tmp_path / "A.log")).events(0))
    assert [e.type for e in events][-2:] == [
        htcondor2.JobEventType.JOB_HELD,
        htcondor2.JobEventType.JOB_ABORTED,
    ]
    assert events[-2]["HoldReasonCode"] == 12


def test_starter_environment_and_job_ad(tmp_path: Path) -> None:
    body = (
        'echo "$OMP_NUM_THREADS|$_CONDOR_SCRATCH_DIR|$(pwd)|$GREETING" > env.txt\n'
        'cp "$_CONDOR_JOB_AD" job.ad'
    )
    job(tmp_path, "A", body, submit=(
        "request_cpus = 2\nrequest_memory = 1GB\nenvironment = \"GREETING='hi there'\"\n"
        '+DagtrainRound = 3\ntransfer_output_files = env.txt, job.ad'))  # fmt: skip
    assert run_dag(dag(tmp_path, "JOB A A.sub\n"), slots=1).ok
    threads, scratch, cwd, greeting = (tmp_path / "env.txt").read_text().strip().split("|")
    assert threads == "2" and scratch == cwd and greeting == "hi there"
    assert Path(cwd).parent == tmp_path / ".local_runner" / "sandbox"
    ad = classad2.parseOne((tmp_path / "job.ad").read_text())
    assert ad["RequestCpus"] == 2 and ad["RequestMemory"] == 1024 and ad["DagtrainRound"] == 3


def test_user_log_parses_with_job_event_log(tmp_path: Path) -> None:
    job(tmp_path, "A", "exit 0", submit="log = shared.log")
    job(tmp_path, "B", "kill -9 $$", submit="log = shared.log")
    path = dag(tmp_path, "JOB A A.sub\nJOB B B.sub\nPARENT A CHILD B\n")
    result = run_dag(path, slots=1)
    assert result.failed == ["B"]
    events = list(htcondor2.JobEventLog(str(tmp_path / "shared.log")).events(0))
    types = [e.type for e in events]
    assert types == [htcondor2.JobEventType.SUBMIT, htcondor2.JobEventType.EXECUTE,
                     htcondor2.JobEventType.JOB_TERMINATED] * 2  # fmt: skip
    assert events[0].cluster < events[3].cluster
    assert events[2]["ReturnValue"] == 0
    assert events[5]["TerminatedBySignal"] == 9


def test_node_status_file_parses_as_classads(tmp_path: Path) -> None:
    job(tmp_path, "A", "exit 0")
    job(tmp_path, "B", "exit 1")
    job(tmp_path, "C", "exit 0")
    path = dag(tmp_path, "JOB A A.sub\nJOB B B.sub\nJOB C C.sub\nPARENT B CHILD C\n"
               "NODE_STATUS_FILE test.dag.status 1\n")  # fmt: skip
    run_dag(path, slots=2)
    ads = list(classad2.parseAds((tmp_path / "test.dag.status").read_text()))
    head, nodes, end = ads[0], {ad["Node"]: ad for ad in ads[1:-1]}, ads[-1]
    assert head["Type"] == "DagStatus" and head["NodesTotal"] == 3
    assert (head["NodesDone"], head["NodesFailed"], head["NodesFutile"]) == (1, 1, 1)
    assert [nodes[n]["NodeStatus"] for n in "ABC"] == [5, 6, 7]
    assert nodes["A"]["JobProcsQueued"] == 0 and end["Type"] == "StatusEnd"
