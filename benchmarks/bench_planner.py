"""The planner against htcondor2.dags, side by side, for a 1,000-node x 100-round synchronous DAG.

Both build the same DAG in memory and write its file: per round a layer of node jobs (VARS round,
rtag, node, ntag, attempt; RETRY 2 UNLESS-EXIT 78; the POST script; CATEGORY train) and one
aggregation job after it, rounds chained, and the FINAL report node. dagtrain's figure is
`run_dag` (the layers, from the resolved config) + `write_dag`; htcondor2.dags' is building its
`DAG` of layers + `DAGWriter.write_dag_file` (the DAG file alone: its per-layer submit files are
left out, as dagtrain's submit files are). What is timed is only that: the config is resolved,
the dataset prepared and every module (torch too) imported before. Both run with the cyclic
garbage collector paused (dagtrain's writer pauses it anyway). The two alternate in one process,
REPEATS times each; the best of each is kept, as CPU time and as wall time. Then the local
runner's parser reads dagtrain's DAG back, and the whole `dagtrain plan` write (DAG, submit
files, payload, initial model, round 0's folders) is timed once, with the initial model apart.

Run:  python benchmarks/bench_planner.py [NODES ROUNDS] [--repeats N]
"""

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import htcondor2
from htcondor2 import dags
from htcondor2.dags.writer import DAGWriter

from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import DAG_FILE, MODELS_DIR, node_tag, round_tag
from pipeline import config
from pipeline.dag.model import paused_gc
from pipeline.dag.run_dag import run_dag
from pipeline.dag.writer import write_dag
from pipeline.dataset_prepare import prepare
from pipeline.local_runner.dag_file import parse_dag
from pipeline.planner import Plan, _initial_model, make_plan, write
from pipeline.textures import generate


def plan_tiny(base: Path, nodes: int, rounds: int, execution: dict[str, str] | None = None) -> Plan:
    """A plan of the given shape over a tiny procedural dataset prepared under base."""
    source = generate(base / "src", classes=4, images_per_class=4, size=128, progress=False)
    prepare(source, base / "dataset", tile=32, overlap=0.5, holdout=0.25, progress=False)
    data = {"dataset": str(base / "dataset"), "local_train": 64, "local_test": 16}
    raw = {"run": {"nodes": nodes, "rounds": rounds}, "data": {**data, "heldout_test": 64}}
    return make_plan(config.from_dict({**raw, "execution": execution or {}}, base_dir=base))


def _dagtrain(cfg: RunConfig, out: Path) -> Path:
    write_dag(run_dag(cfg), out / DAG_FILE)
    return out / DAG_FILE


def _htcondor_dags(cfg: RunConfig, out: Path) -> Path:
    """The generic generator's figure: its DAG of layers, then its DAG file alone."""
    DAGWriter(reference_dag(cfg)).write_dag_file(out / DAG_FILE)
    return out / DAG_FILE


def reference_dag(cfg: RunConfig) -> dags.DAG:
    """The same DAG through the generic generator: layers of nodes, many-to-many edges."""
    run = cfg.run
    dag = dags.DAG(node_status_file=dags.NodeStatusFile(Path("dagtrain.dag.status"), 10))
    node_sub = htcondor2.Submit({"executable": "/bin/true", "initialdir": "rounds/$(rtag)"})
    agg_sub = htcondor2.Submit({"executable": "/bin/true", "universe": "local"})
    post = dags.Script("scripts/node_post.sh", ["$RETURN", "$RETRY", "$MAX_RETRIES", "$JOB"])
    retry = {"retries": run.retries, "retry_unless_exit": 78, "post": post}
    previous = None
    for r in range(run.rounds):
        rtag = round_tag(r)
        nodes = [
            {
                "round": str(r),
                "rtag": rtag,
                "node": str(n),
                "ntag": node_tag(n),
                "attempt": "$(RETRY)",
            }
            for n in range(run.nodes)
        ]
        spec = {"submit_description": node_sub, "vars": nodes, "category": "train", **retry}
        if previous is None:
            layer = dag.layer(name=f"train_{rtag}", **spec)
        else:
            layer = previous.child_layer(name=f"train_{rtag}", **spec)
        previous = layer.child_layer(
            name=f"aggregate_{rtag}",
            submit_description=agg_sub,
            vars=[{"round": str(r), "rtag": rtag, "attempt": "$(RETRY)"}],
            category="aggregate",
            **retry,
        )
    dag.final(name="report", submit_description=agg_sub)
    return dag


def _best(
    builders: dict[str, Callable[[RunConfig, Path], Path]], cfg: RunConfig, base: Path, repeats: int
) -> dict[str, tuple[float, float, int]]:
    """Best CPU time, best wall time and DAG file size of each builder, alternating them. On a
    shared machine the process's CPU time is the fair figure: it counts what each generator
    costs, not the time other processes take from it."""
    best: dict[str, tuple[float, float, int]] = {}
    for attempt in range(repeats):
        for name, build in builders.items():
            out = base / f"{name}{attempt}"
            out.mkdir()
            with paused_gc():
                cpu, wall = time.process_time(), time.perf_counter()
                dag_file = build(cfg, out)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            before = best.get(name, (cpu, wall, 0))
            best[name] = (min(before[0], cpu), min(before[1], wall), dag_file.stat().st_size)
    return best


def _files(path: Path) -> int:
    return sum(len(names) + len(dirs) for _root, dirs, names in os.walk(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", nargs="*", type=int, default=[1000, 100], help="NODES ROUNDS")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    nodes, rounds = args.shape
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        plan = plan_tiny(base, nodes, rounds)
        builders = {"dagtrain": _dagtrain, "htcondor2.dags": _htcondor_dags}
        best = _best(builders, plan.config, base, args.repeats)
        started = time.process_time()
        parsed = parse_dag(base / "dagtrain0" / DAG_FILE)
        parse = time.process_time() - started
        started, wall = time.process_time(), time.perf_counter()
        run_dir = write(plan, base / "run")
        written, written_wall = time.process_time() - started, time.perf_counter() - wall
        files = _files(run_dir)
        (base / "model" / MODELS_DIR).mkdir(parents=True)
        started = time.process_time()
        _initial_model(plan, base / "model")
        model = time.process_time() - started
    print(f"{nodes} nodes x {rounds} rounds = {nodes * rounds + rounds + 1} DAG nodes")
    for name, (cpu, wall, size) in best.items():
        print(
            f"{name:>15}: build + write the DAG {cpu:6.2f} s CPU ({wall:6.2f} s wall), "
            f"DAG file {size / 1e6:5.1f} MB"
        )
    ours, theirs = best["dagtrain"], best["htcondor2.dags"]
    print(
        f"dagtrain / htcondor2.dags: CPU time {ours[0] / theirs[0]:.2f}x, wall time "
        f"{ours[1] / theirs[1]:.2f}x, DAG file {ours[2] / theirs[2]:.2f}x"
    )
    print(
        f"the local runner reads dagtrain's DAG back: {parse:.2f} s CPU ({len(parsed.nodes)} nodes)"
    )
    print(
        f"dagtrain plan's whole write: {written:.2f} s CPU ({written_wall:.2f} s wall, {files} "
        f"files and folders), of which the initial model {model:.2f} s CPU"
    )


if __name__ == "__main__":
    main()
