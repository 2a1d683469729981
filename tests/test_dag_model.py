"""The DAG as data: the written DAG file reads back as the planned model, and the writer and
the local runner's parser agree on every command they share."""

from collections.abc import Callable
from pathlib import Path

import pytest

from aggregation.async_claim import EXIT_SKIP
from node_payload.common.errors import EXIT_FATAL, UserError
from node_payload.common.run_layout import DAG_FILE
from pipeline import config as config_mod
from pipeline.dag.model import Dag, Layer, LayeredDag, Node, Script
from pipeline.dag.writer import dag_text, dag_var
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
    # one POST script for every node: its folder follows from its name ($JOB)
    post = Script("scripts/node_post.sh", ["$RETURN", "$RETRY", "$MAX_RETRIES", "$JOB"])
    assert node.post == post and dag.nodes["aggregate_r001"].post == post
    assert node.vars["attempt"] == "$(RETRY)" and "ltag" not in node.vars  # no residual to hand on
    assert "seed" not in node.vars  # the job draws from the run's seed, its round and node
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


def test_what_every_node_shares_is_written_once_as_all_nodes(tmp_path: Path) -> None:
    dag = Dag(tmp_path / "shared.dag")
    post = Script("post.sh", ["$JOB", "$RETURN"])
    names = []
    for i in range(40):
        node = Node(f"node_{i:04d}", "n.sub", vars={"i": str(i), "try": "$(RETRY)"}, post=post)
        node.retries, node.unless_exit, node.category = 2, 78, "train"
        names.append(dag.add(node).name)
    end = dag.add(Node("end", "e.sub", vars={"try": "$(RETRY)"}, post=post, category="merge"))
    end.retries, end.unless_exit = 5, 78
    dag.connect(names, [end.name])
    dag.add(Node("report", "r.sub", final=True, vars={"why": "FINAL nodes are never shared"}))
    text = dag_text(dag)
    assert 'VARS ALL_NODES try="$(RETRY)"' in text.splitlines()
    assert "SCRIPT POST ALL_NODES post.sh $JOB $RETURN" in text.splitlines()
    assert "RETRY ALL_NODES 2 UNLESS-EXIT 78" in text.splitlines()
    assert "CATEGORY ALL_NODES train" in text.splitlines()
    assert [line for line in text.splitlines() if line.split()[1:2] == ["end"]] == [
        "JOB end e.sub",
        "RETRY end 5 UNLESS-EXIT 78",
        "CATEGORY end merge",
    ]
    assert sum(line.startswith("VARS node_0007 ") for line in text.splitlines()) == 1
    assert len([line for line in text.splitlines() if line.startswith("PARENT")]) == 1
    dag.path.write_text(text)
    assert parse_dag(dag.path) == dag


def test_a_retry_without_unless_exit_is_never_shared_over_one_with_it(tmp_path: Path) -> None:
    """DAGMan keeps an earlier UNLESS-EXIT when a later RETRY line has none."""
    dag = Dag(tmp_path / "retry.dag")
    for i, unless in enumerate([78, 78, None]):
        node = dag.add(Node(f"n{i}", "n.sub"))
        node.retries, node.unless_exit = 2, unless
    text = dag_text(dag)
    assert "ALL_NODES" not in text
    dag.path.write_text(text)
    assert parse_dag(dag.path) == dag


def test_all_nodes_applies_in_file_order_and_skips_the_final_node(tmp_path: Path) -> None:
    """As DAGMan's manual shows it: the last command that sets a node's property wins."""
    path = tmp_path / "given.dag"
    path.write_text(
        "JOB A a.sub\nJOB B b.sub\nFINAL F f.sub\n"
        'VARS A name="A"\nVARS all_nodes name="X"\nVARS B name="nodeB"\n'
        "RETRY ALL_NODES 3\nPRIORITY B 7\nPRIORITY ALL_NODES 1\n"
    )
    dag = parse_dag(path)
    assert [dag.nodes[n].vars for n in "ABF"] == [{"name": "X"}, {"name": "nodeB"}, {}]
    assert [(dag.nodes[n].retries, dag.nodes[n].priority) for n in "ABF"] == [
        (3, 1),
        (3, 1),
        (0, 0),
    ]
    path.write_text("JOB A a.sub\nJOB B b.sub\nPARENT ALL_NODES CHILD B\n")
    with pytest.raises(UserError, match=r"given.dag:3: ALL_NODES cannot stand for a node here"):
        parse_dag(path)


def test_the_writer_refuses_what_a_dag_line_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whitespace"):
        dag_text(Dag(tmp_path / "x.dag", nodes={"a b": Node("a b", "a.sub")}))
    with pytest.raises(ValueError, match="line break"):
        dag_var("two\nlines")


def test_a_layer_is_written_as_the_nodes_it_stands_for(tmp_path: Path) -> None:
    """A layer's nodes share all but their names and VARS columns; a layer may wait for nodes
    declared after it, and its PARENT line then follows theirs."""
    dag = LayeredDag(tmp_path / "layers.dag", comment=("layers",))
    post = Script("post.sh", ["$JOB"])
    names, tags = ["a0", "a1", "a2"], ["x", 'say "{hi}"', "\\o/"]
    dag.layers += [
        Layer(
            names,
            "a.sub",
            vars={"tag": tags, "round": "0"},
            parents=["b"],
            post=post,
            retries=2,
            comment=("---- a ----",),
        ),
        Layer(["b"], "b.sub", vars={"round": "1"}, post=post, retries=2, category="merge"),
        Layer(["end"], "end.sub", final=True, vars={"why": "{}"}),
    ]
    text = dag_text(dag)
    assert 'VARS a1 tag="say \\"{hi}\\"" round="0"' in text.splitlines()
    assert text.index("JOB b b.sub") < text.index("PARENT b CHILD a0 a1 a2")
    assert "RETRY ALL_NODES 2" in text.splitlines() and "CATEGORY b merge" in text.splitlines()
    dag.path.write_text(text)
    parsed = parse_dag(dag.path)
    assert parsed == dag.expand()
    assert parsed.nodes["a2"].vars == {"tag": "\\o/", "round": "0"}
    assert parsed.nodes["a0"].comment == ("---- a ----",) and parsed.nodes["a1"].comment == ()
    assert parsed.nodes["b"].children == set(names) and parsed.final == "end"


def test_the_writer_refuses_a_parent_that_is_never_declared(tmp_path: Path) -> None:
    dag = LayeredDag(tmp_path / "x.dag", layers=[Layer(["a"], "a.sub", parents=["ghost"])])
    with pytest.raises(ValueError, match="never declared: 'ghost'"):
        dag_text(dag)


def test_vars_lines_alike_but_for_their_values_read_each_their_own(tmp_path: Path) -> None:
    """The parser learns a VARS line's keys from the first line of its shape; escapes, +names and
    repeated keys still read as DAGMan reads them."""
    path = tmp_path / "vars.dag"
    path.write_text(
        "JOB A a.sub\nJOB B b.sub\nJOB C c.sub\nJOB D d.sub\n"
        'VARS A +x="1" y="a"\nVARS B +x="2" y="b"\nVARS C +x="3\\"" y="c"\n'
        'VARS D k="1" k="2"\nVARS A k="3" k="4"\n'
    )
    dag = parse_dag(path)
    assert [dag.nodes[n].vars for n in "ABCD"] == [
        {"MY.x": "1", "y": "a", "k": "4"},
        {"MY.x": "2", "y": "b"},
        {"MY.x": '3"', "y": "c"},
        {"k": "2"},
    ]
    path.write_text('JOB A a.sub\nJOB B b.sub\nVARS A q="1"\nVARS B queue="2"\n')
    with pytest.raises(UserError, match=r"vars.dag:4: VARS name 'queue' may not begin"):
        parse_dag(path)
