"""The DAG of a run, from its resolved config: synchronous rounds (a layer of node jobs, then
one aggregation job, rounds chained) or asynchronous lanes (chains of node jobs whose PRE script
claims the newest model and whose POST script applies the update), and the FINAL report.

A round's node jobs are one layer: their names and node columns are made once per round, and
nothing else per job, so planning 100,000 jobs costs about as much as writing their lines."""

from itertools import pairwise
from pathlib import Path

from aggregation.async_claim import EXIT_SKIP
from aggregation.async_state import lane_length
from node_payload.common.errors import EXIT_FATAL
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import (
    AGGREGATE_SUBMIT,
    CONFIG_FILE,
    DAG_FILE,
    LANE_SCRIPT,
    NODE_POST_SCRIPT,
    NODE_SUBMIT,
    REPORT_SUBMIT,
    STATUS_FILE,
    aggregate_name,
    job_tag,
    lane_job_name,
    lane_tag,
    node_name,
    node_tag,
    round_tag,
)

from .model import Layer, LayeredDag, Script, paused_gc

STATUS_INTERVAL_S = 10
TRAIN, AGGREGATE = "train", "aggregate"  # node categories; MAXJOBS throttles TRAIN
REPORT = "report"
ATTEMPT = "$(RETRY)"  # every job's VARS attempt: how many times DAGMan has retried it
# Every node of a synchronous run shares it (the DAG writes it once, as ALL_NODES): the node's
# name tells the script its folder, and for an aggregation it passes the job's exit code on.
_NODE_POST = Script(NODE_POST_SCRIPT, ["$RETURN", "$RETRY", "$MAX_RETRIES", "$JOB"])
SUBMIT_HINT = (
    f"Written by `dagtrain plan`. Submit from this directory:  condor_submit_dag {DAG_FILE}"
)


def run_dag(config: RunConfig) -> LayeredDag:
    dag = LayeredDag(Path(DAG_FILE), status_file=STATUS_FILE, status_min_update=STATUS_INTERVAL_S)
    if config.run.max_node_jobs:
        dag.maxjobs[TRAIN] = config.run.max_node_jobs
    with paused_gc():
        if config.is_async:
            _lanes(dag, config)
        else:
            _rounds(dag, config)
    dag.layers.append(Layer([REPORT], REPORT_SUBMIT, final=True, comment=("---- report ----",)))
    return dag


def _rounds(dag: LayeredDag, config: RunConfig) -> None:
    run = config.run
    dag.comment = (
        f'dagtrain run "{run.name}": {run.nodes} node jobs x {run.rounds} synchronous rounds.',
        SUBMIT_HINT,
        "Round r: node jobs train_rRRR_nNNN (each trains the global model on its own local data),",
        "then aggregate_rRRR merges their updates into models/global_r{r+1}. The FINAL node writes",
        "report.json whatever happens.",
    )
    retried = _retried(config)
    nodes = [str(n) for n in range(run.nodes)]
    ntags = [node_tag(n) for n in range(run.nodes)]
    waiting_for: list[str] = []
    for r in range(run.rounds):
        rtag = round_tag(r)
        variables = {"round": str(r), "rtag": rtag}
        # Node n's job in round r (a compressed update's residual stays on the execute machine).
        jobs = Layer(
            [node_name(r, n) for n in range(run.nodes)],
            NODE_SUBMIT,
            vars=variables | {"node": nodes, "ntag": ntags, "attempt": ATTEMPT},
            parents=waiting_for,
            post=_NODE_POST,
            category=TRAIN,
            comment=(f"---- round {r} ----",),
            **retried,
        )
        aggregate = Layer(
            [aggregate_name(r)],
            AGGREGATE_SUBMIT,
            vars=variables | {"attempt": ATTEMPT},
            parents=jobs.names,
            post=_NODE_POST,
            category=AGGREGATE,
            **retried,
        )
        dag.layers += [jobs, aggregate]
        waiting_for = aggregate.names


def _lanes(dag: LayeredDag, config: RunConfig) -> None:
    run, length = config.run, lane_length(config)
    budget = f"{config.update_budget} updates in all"
    if config.async_.time_budget_s:
        budget += f" or {config.async_.time_budget_s} s"
    dag.comment = (
        f'dagtrain run "{run.name}": {run.nodes} asynchronous lanes, {budget}.',
        SUBMIT_HINT,
        "Lane l is a chain of node jobs train_lLLL_jJJJJ. Each job's PRE script hands it the newest",
        "global model, or skips it (PRE_SKIP) while the budget is spoken for; its POST script applies",
        f"its update at once (every {config.async_.buffer} arrival(s)), under a lock, weighted by "
        "its staleness.",
        f"A lane holds at most {length} jobs, so fast lanes can do the work of slow ones.",
        "The FINAL node applies what is left in the buffer and writes report.json.",
    )
    for lane in range(run.nodes):
        jobs = [_lane_job(config, lane, step) for step in range(length)]
        jobs[0].comment = (f"---- lane {lane} ----",)
        for before, after in pairwise(jobs):
            after.parents = before.names
        dag.layers += jobs


def _lane_job(config: RunConfig, lane: int, step: int) -> Layer:
    """A lane's job `step`, a layer of its own since its scripts name it: its PRE script hands it
    the newest model, or skips it once the budget is spoken for; its POST script applies its
    update."""
    variables = {"round": str(step), "node": str(lane), "ltag": lane_tag(lane)}
    variables |= {"jtag": job_tag(step), "attempt": ATTEMPT}
    which = ["--config", CONFIG_FILE, "--lane", str(lane), "--step", str(step)]
    retry = ["--return", "$RETURN", "--retry", "$RETRY", "--max-retries", "$MAX_RETRIES"]
    return Layer(
        [lane_job_name(lane, step)],
        NODE_SUBMIT,
        vars=variables,
        pre=Script(LANE_SCRIPT, ["claim", *which]),
        pre_skip=EXIT_SKIP,
        post=Script(LANE_SCRIPT, ["arrive", *which, *retry]),
        category=TRAIN,
        **_retried(config),
    )


def _retried(config: RunConfig) -> dict[str, int]:
    """Every job is retried `[run] retries` times, unless it exits fatally (a bad config)."""
    return {"retries": config.run.retries, "unless_exit": EXIT_FATAL}
