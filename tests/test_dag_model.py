"""The DAG as data: the written DAG file reads back as the planned model, and the writer and
the local runner's parser agree on every command they share."""

from collections.abc import Callable
from pathlib import Path

import pytest

from aggregation.async_claim import EXIT_SKIP
from node_payload.common.errors import EXIT_FATAL
from node_payload.common.run_layout import DAG_FILE
from pipeline import config as config_mod
from pipeline.dag.model import Dag, Node, Script
from pipeline.dag.writer import WIDTH, dag_text, dag_var
from pipeline.local_runner.dag_file import parse_dag
from pipeline.planner import make_plan, write

DGC = {"compression__method": '"dgc"'}


@pytest.mark.parametrize(
    "overrides",
    [{}, {"run__mode": '"async"'}, DGC, {"run__mode": '"async"', **DGC}],
    ids=["sync", "async", "sync-compressed", "async-compressed"],
)
def test_the_written_dag_reads_back_as_planned(
    tiny_config: Callable[..., Path], tmp_path: Path, overrides: dict[str, str]
) -> None:
    plan = make_plan(config_mod.load(tiny_config(run__max_node_jobs="2", **overrides)))
    run_dir = write(plan, tmp_path / "run")
    assert parse_dag(run_dir / DAG_FILE) == plan.dag


def test_a_synchronous_round_is_a_layer_of_node_jobs_then_its_aggregation(
    tiny_config: Callable[..., Path],
) -> None:
    dag = make_plan(config_mod.load(tiny_config(**DGC))).dag
    round_1 = ["train_r001_n000", "train_r001_n001", "train_r001_n002"]
    assert list(dag.nodes)[4:9] == [*round_1, "aggregate_r001", "report"]
    assert all(dag.nodes[name].parents == {"aggregate_r000"} for name in round_1)
    assert dag.nodes["aggregate_r001"].parents == set(round_1)
    assert dag.nodes["aggregate_r001"].children == set()
    node = dag.nodes["train_r001_n002"]
    assert (node.retries, node.unless_exit, node.category) == (2, EXIT_FATAL, "train")
    assert node.post == Script(
        "scripts/node_post.sh",
        ["$RETURN", "$RETRY", "$MAX_RETRIES", "rounds/r001/n002"],
    )
    assert node.vars["attempt"] == "$(RETRY)" and "ltag" not in node.vars  # no residual to hand on
    assert dag.final == "report" and dag.nodes["report"].submit == "submit/report.sub"
    assert dag.status_file == "dagtrain.dag.status" and not dag.maxjobs


def test_an_asynchronous_lane_is_a_chain_of_claiming_jobs(
    tiny_config: Callable[..., Path],
) -> None:
    dag = make_plan(config_mod.load(tiny_config(run__mode='"async"', run__max_node_jobs="2"))).dag
    node = dag.nodes["train_l001_j0003"]
    assert node.parents == {"train_l001_j0002"} and node.pre_skip == EXIT_SKIP
    which = ["--config", "config.toml", "--lane", "1", "--step", "3"]
    assert node.pre == Script("scripts/lane.sh", ["claim", *which])
    assert node.post is not None and node.post.args[: len(which) + 1] == ["arrive", *which]
    assert dag.maxjobs == {"train": 2}


EVERY_COMMAND = """\
# a header
#
# of three lines
CONFIG dagman.config
NODE_STATUS_FILE status.txt 30

# the first node
JOB A a.sub DIR sub DONE
VARS A x="say \\"hi\\" \\\\o/" +Flavour="$(JOB)"
SCRIPT DEFER 3 20 PRE A pre.sh $JOB $RETRY
PRE_SKIP A 7
SCRIPT POST A post.sh $RETURN
RETRY A 3 UNLESS-EXIT 9
CATEGORY A heavy
PRIORITY A -5
ABORT-DAG-ON A 4 RETURN 0
JOB B b.sub
RETRY B 1
JOB C c.sub
PARENT A CHILD B C
MAXJOBS heavy 2
FINAL F f.sub
"""


def test_the_writer_writes_every_command_the_parser_reads(tmp_path: Path) -> None:
    (tmp_path / "dagman.config").write_text("DAGMAN_MAX_JOBS_SUBMITTED = 4\n")
    (tmp_path / "given.dag").write_text(EVERY_COMMAND)
    given = parse_dag(tmp_path / "given.dag")
    (tmp_path / "written.dag").write_text(dag_text(given))
    assert parse_dag(tmp_path / "written.dag") == given
    assert given.comment == ("a header", "", "of three lines")
    a = given.nodes["A"]
    assert a.comment == ("the first node",) and a.directory == tmp_path / "sub"
    assert a.vars == {"x": 'say "hi" \\o/', "MY.Flavour": "$(JOB)"}
    assert given.max_jobs_submitted == 4 and given.status_min_update == 30


def test_long_vars_and_edges_are_wrapped(tmp_path: Path) -> None:
    dag = Dag(tmp_path / "wide.dag")
    names = [dag.add(Node(f"node_{i:04d}", "n.sub", vars={"i": "7" * 30})).name for i in range(40)]
    dag.nodes[names[0]].vars |= {f"v{i}": "x" * 20 for i in range(10)}
    end = dag.add(Node("end", "n.sub")).name
    dag.connect(names, [end])
    text = dag_text(dag)
    assert max(map(len, text.splitlines())) <= WIDTH
    dag.path.write_text(text)
    assert parse_dag(dag.path) == dag


def test_the_writer_refuses_what_a_dag_line_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whitespace"):
        dag_text(Dag(tmp_path / "x.dag", nodes={"a b": Node("a b", "a.sub")}))
    with pytest.raises(ValueError, match="line break"):
        dag_var("two\nlines")
