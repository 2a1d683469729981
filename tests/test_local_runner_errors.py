"""Unsupported or malformed DAG and submit files fail with the file and line named."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_local_runner_helpers import dag, job

from node_payload.common.errors import UserError
from pipeline.local_runner import run_dag


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("JOB A A.sub\nSUBDAG EXTERNAL S s.dag\n", r"test\.dag:2: DAG command SUBDAG"),
        ("JOB A A.sub\nSPLICE S s.dag\n", r"test\.dag:2: DAG command SPLICE"),
        ("JOB A A.sub\nFROBNICATE A\n", r"test\.dag:2: unknown DAG command 'FROBNICATE'"),
        ("JOB A A.sub\nJOB A A.sub\n", r"test\.dag:2: duplicate node name 'A'"),
        ("JOB PARENT A.sub\n", r"test\.dag:1: node name 'PARENT' is a DAG keyword"),
        ("JOB A A.sub\nPARENT A CHILD Z\n", r"test\.dag:2: unknown node 'Z'"),
        ('JOB A A.sub\nVARS Z x="1"\n', r"test\.dag:2: unknown node 'Z'"),
        ("JOB A A.sub\nVARS A x=1\n", r"test\.dag:2: malformed VARS"),
        ("JOB A A.sub\nRETRY A many\n", r"test\.dag:2: retry count must be an integer"),
        ("JOB A A.sub\nJOB B A.sub\nPARENT A CHILD B\nPARENT B CHILD A\n", r"cycle"),
        ("JOB A A.sub\nFINAL F A.sub\nPARENT A CHILD F\n", r"test\.dag:3: FINAL node 'F'"),
    ],
)
def test_dag_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    job(tmp_path, "A", "exit 0")
    with pytest.raises(UserError, match=message):
        run_dag(dag(tmp_path, text), slots=1)


def test_keywords_are_case_insensitive_and_comments_ignored(tmp_path: Path) -> None:
    job(tmp_path, "A", "exit 0")
    job(tmp_path, "B", "exit 0")
    text = "# comment\n\njob A A.sub\nJob B B.sub\nparent A child B\nDot graph.dot\n"
    assert run_dag(dag(tmp_path, text), slots=1).done == ["A", "B"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("max_retries = 3", r"A\.sub:7: only max_retries = 0 is supported locally"),
        ("request_gpus = 1", r"A\.sub:7: request_gpus > 0"),
        ("universe = docker", r"A\.sub:7: universe 'docker'"),
        ("queue 2", r"expected exactly one 'queue'"),
    ],
)
def test_submit_errors_name_file_and_line(tmp_path: Path, extra: str, message: str) -> None:
    job(tmp_path, "A", "exit 0", submit=extra)
    with pytest.raises(UserError, match=message):
        run_dag(dag(tmp_path, "JOB A A.sub\n"), slots=1)


def test_macro_definitions_used_by_the_file_are_accepted(tmp_path: Path) -> None:
    out = tmp_path / "m.txt"
    job(tmp_path, "A", f'echo "$1" > {out}', submit="tag = abc\narguments = $(tag)-$(ClusterId)")
    assert run_dag(dag(tmp_path, "JOB A A.sub\n"), slots=1).ok
    assert out.read_text().startswith("abc-")
