"""`dagtrain simulate` against measured runs, and its speed on a 1,000-machine pool.

Validation: each case is planned and run on the local runner (slow slots, [faults]), then the
same config is simulated on a pool model of the local runner's slots (dedicated, matched at
once, the lowest free slot first), calibrated only from what the run itself measured per job:
the time of one SGD step (a node job's own time, fetch and local evaluation included, unslowed,
over its steps) and the start-up costs (a node job's wall time in its job log less its own time;
what a slot's first job takes more, the warm interpreter's start; an aggregation's and the
report's wall time; a POST script's; an asynchronous claim's, and an arrival's before and under
the ledger's lock). The predicted wall time and mean
node utilization are compared with report.json's, and the command's own wall time with the
simulated time to finish.

Scale: a 1,000-node x 100-round synchronous run planned and simulated on 1,000 desktop machines
(the default pool model), timed apart.

Pool: with --pool, case a on tests/condor_pool's personal HTCondor pool (as root; its node 0
slowed by [faults] slow), on a pool model of its 4 slots and short intervals.

Run:  python benchmarks/bench_simulate.py [OUT] [--cases a,b,c] [--no-scale] [--pool]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from statistics import fmean
from typing import Any

from aggregation.async_state import lane_step
from node_payload.common.run_config import read_run_config
from node_payload.common.run_layout import (
    ASYNC_STATE,
    CONFIG_FILE,
    DAG_FILE,
    LANE_SCRIPT,
    METRICS_FILE,
    NODE_POST_SCRIPT,
    REPORT_FILE,
    lane_job_dir,
)
from pipeline.config import load
from pipeline.dataset_prepare import prepare
from pipeline.local_run import run_local
from pipeline.planner import plan_from_file
from pipeline.simulate import pool_model
from pipeline.simulate.command import pool_for
from pipeline.simulate.engine import simulate
from pipeline.simulate.summary import summarise
from pipeline.simulate.workload import plan_workload
from pipeline.textures import generate

SLOTS = 4
CONFIG = """\
[run]
name = "bench-simulate"
nodes = 4
rounds = 3
seed = 1
[data]
dataset = "{dataset}"
local_train = 96
local_test = 32
heldout_test = 96
[train]
local_steps = 30
batch_size = 16
"""
# name: (config overrides, slow slots)
CASES: dict[str, tuple[list[str], dict[int, float]]] = {
    "a": (["run.mode=sync"], {0: 3.0}),
    "b": (
        [
            "run.mode=sync",
            "run.quorum=0.5",
            "run.retries=1",
            "run.node_deadline_s=40",
            "faults.fail=[[1, 1]]",
            "faults.hang=[[0, 2]]",
        ],
        {3: 2.0},
    ),
    "c": (["run.mode=async"], {0: 3.0}),
}
LABELS = {
    "a": "sync, slow slot 0 x3",
    "b": "sync, quorum 0.5, [faults] fail + hang (deadline 40 s), slow slot 3 x2",
    "c": "async, slow slot 0 x3",
}


def _dataset(out: Path) -> Path:
    prepared = out / "prepared"
    if not (prepared / "manifest.json").is_file():
        source = generate(out / "textures", classes=4, images_per_class=6, size=128, seed=3)
        prepare(source, prepared, tile=32, overlap=0.5, holdout=0.25, seed=0, progress=False)
    return prepared


def _stamp(date: str, clock: str) -> float:
    """A job log's event time: ISO dates (the local runner, HTCondor's ISO_DATE) or MM/DD."""
    if "/" not in date:
        return datetime.strptime(f"{date} {clock}", "%Y-%m-%d %H:%M:%S").timestamp()
    month_day = date.split("/")[:2]
    year = datetime.now().year
    return datetime.strptime(
        f"{year}/{'/'.join(month_day)} {clock}", "%Y/%m/%d %H:%M:%S"
    ).timestamp()


def _log_times(path: Path) -> list[tuple[int, float]]:
    """(event code, time) of each event in a job log (one-second resolution)."""
    events = []
    for line in path.read_text().splitlines():
        parts = line.split(" ")
        if len(parts) > 3 and parts[0].isdigit() and parts[1].startswith("("):
            events.append((int(parts[0]), _stamp(parts[2], parts[3])))
    return events


def _slot(path: Path) -> str:
    """The host (slot) a job log says the job's last run executed on."""
    hosts = [line for line in path.read_text().splitlines() if line.startswith("001 ")]
    return hosts[-1].rsplit("host:", 1)[-1].strip() if hosts else ""


def _first_start(path: Path) -> float:
    return next((t for code, t in _log_times(path) if code == 1), 0.0)


def _wall(path: Path) -> float | None:
    """The last run's executing-to-terminated time in a job log."""
    times = _log_times(path)
    starts = [t for code, t in times if code == 1]
    ends = [t for code, t in times if code == 5]
    return ends[-1] - starts[-1] if starts and ends and ends[-1] >= starts[-1] else None


def _accepting_post(run_dir: Path) -> list[str | Path]:
    """The POST script of a node job it accepted (it then only reads and returns 0)."""
    job = next(run_dir.glob("rounds/r000/n*/metrics.json")).parent
    return [run_dir / NODE_POST_SCRIPT, "0", "0", "1", f"train_r000_{job.name}"]


def _timed(run_dir: Path, command: list[str | Path]) -> float:
    """A script's cost: run from the run directory five times, as DAGMan would run it."""
    started = time.perf_counter()
    for _ in range(5):
        subprocess.run(command, cwd=run_dir, capture_output=True)
    return (time.perf_counter() - started) / 5


def _async_scripts(run_dir: Path) -> dict[str, float]:
    """A lane's PRE script (a claim, timed: on the finished run it skips, as most late claims
    do), and an arrival's POST script: from its job's end (or the version before, while the
    ledger was locked) to the lane's next job, less a claim."""
    claim = [run_dir / LANE_SCRIPT, "claim", "--config", CONFIG_FILE, "--lane", "0", "--step", "0"]
    script_s = _timed(run_dir, claim)
    ledger = json.loads((run_dir / ASYNC_STATE).read_text())
    arrivals, applies, previous = [], [], 0.0
    for version in ledger["versions"]:
        for key in version["updates"]:
            lane, step = lane_step(key)
            ended = max(
                t for c, t in _log_times(lane_job_dir(run_dir, lane, step) / "job.log") if c == 5
            )
            if ended < previous:  # it waited for the lock: the versions' gap is one apply
                applies.append(version["at"] - previous)
            following = lane_job_dir(run_dir, lane, step + 1) / "job.log"
            if following.is_file():
                submitted = _log_times(following)[0][1]
                arrivals.append(submitted - max(ended, previous) - script_s)
        previous = version["at"]
    apply_s = fmean(applies) if applies else 0.0
    return {
        "arrive_s": max(0.0, fmean(arrivals) - apply_s),
        "apply_s": apply_s,
        "script_s": script_s,
    }


def calibrate(run_dir: Path) -> dict[str, float]:
    """Per-step time and start-up costs, measured in the run itself."""
    steps, startups, first = [], {}, {}
    for metrics_path in run_dir.glob("**/" + METRICS_FILE):
        metrics = json.loads(metrics_path.read_text())
        work = metrics["real_seconds"]  # fetch, training and local evaluation, unslowed
        steps.append(work / metrics["local_steps"])
        log = metrics_path.parent / "job.log"
        wall = _wall(log)
        if wall is not None and metrics["slowdown"] == 1:
            startups[log] = wall - work
        slot, start = _slot(log), _first_start(log)
        if slot not in first or start < first[slot][0]:
            first[slot] = (start, log)
    firsts = [startups[log] for _, log in first.values() if log in startups]
    later = [s for log, s in startups.items() if all(log != f for _, f in first.values())]
    aggregations = [_wall(p) for p in run_dir.glob("rounds/r*/aggregate.log")]
    report = _wall(run_dir / "report.log")
    return {
        "step_s": fmean(steps),
        "startup_s": max(0.0, fmean(later)),
        "first_startup_s": max(0.0, fmean(firsts) - fmean(later)) if firsts else 0.0,
        "aggregate_s": fmean([w for w in aggregations if w is not None] or [0.0]),
        "report_s": report or 0.0,
    } | (
        _async_scripts(run_dir)
        if (run_dir / ASYNC_STATE).is_file()
        else {"script_s": _timed(run_dir, _accepting_post(run_dir))}
    )


def local_pool(measured: dict[str, float], slow: dict[int, float]) -> pool_model.PoolModel:
    """The local runner's slots as a pool: dedicated, matched at once, lowest slot first."""
    return pool_model.from_dict(
        {
            "machines": {
                "count": SLOTS,
                "speed": "constant",
                "order": "listed",
                "slow": [[s, f] for s, f in slow.items()],
            },
            "availability": {"on": "always"},
            "negotiation": {
                "interval_s": 0,
                "claim_reuse_s": 0,
                "periodic_s": 1,
                "submit_interval_s": 0,
            },
            "transfer": {"submit_host_mb_s": 1e4, "mirrors_mb_s": 1e4, "machine_mb_s": 1e4},
            "jobs": {**measured, "merge_mb_s": 1e4},
        },
        "local runner",
    )


def validate(out: Path, name: str) -> dict[str, Any]:
    overrides, slow = CASES[name]
    config = out / f"{name}.toml"
    config.write_text(CONFIG.format(dataset=_dataset(out)))
    run_dir = out / f"run_{name}"
    if not run_dir.exists():
        plan_from_file(config, run_dir, overrides)
    started = time.perf_counter()
    report = run_local(run_dir, slots=SLOTS, show_progress=False, slow_slots=slow, force=True)
    measured_total = time.perf_counter() - started
    measured = calibrate(run_dir)
    work = plan_workload(load(config, overrides))
    trace = simulate(work, local_pool(measured, slow), seed=0)
    predicted = summarise(LABELS[name], trace, work, SLOTS)
    return {"case": LABELS[name], **_compared(measured, report, measured_total, predicted)}


def _compared(
    measured: dict[str, float],
    report: dict[str, Any],
    measured_total: float,
    predicted: dict[str, Any],
) -> dict[str, Any]:
    """A case's calibration, what its run measured and what the simulation predicted."""
    return {
        "calibration": measured,
        "measured": {
            "wall_seconds": report["wall_seconds"],
            "mean_utilization": report["mean_utilization"],
            "command_seconds": measured_total,
        },
        "predicted": {
            "wall_seconds": predicted["wall_seconds"],
            "mean_utilization": predicted["mean_utilization"],
            "seconds_to_finish": predicted["seconds_to_finish"],
        },
    }


def condor_pool_model(measured: dict[str, float]) -> pool_model.PoolModel:
    """tests/condor_pool's personal pool: 4 slots, the intervals its provision.sh sets
    (NEGOTIATOR_INTERVAL, PERIODIC_EXPR_INTERVAL 2 s, DAGMAN_USER_LOG_SCAN_INTERVAL 1 s)."""
    pool = local_pool(measured, {})
    negotiation = replace(pool.negotiation, interval_s=2.0, periodic_s=2.0, submit_interval_s=1.0)
    return replace(pool, negotiation=negotiation, machines=replace(pool.machines, order="random"))


def pool_run(out: Path) -> dict[str, Any]:
    """Case a on the test pool (a node slowed by [faults] slow: a pool has no slow slots)."""
    from pipeline.local_run import embedded_mirrors
    from tests.condor_pool.fixtures import REPO, WORK_BASE
    from tests.condor_pool.pool import CondorPool, provision, reason_unavailable

    reason = reason_unavailable()
    if reason is not None:
        raise SystemExit(f"no test pool here: {reason}")
    provision()
    overrides = ["run.mode=sync", "faults.slow=[[0, 3.0]]"]
    WORK_BASE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-simulate-", dir=WORK_BASE))
    config = work / "pool.toml"
    config.write_text(CONFIG.format(dataset=_dataset(out)))
    run_dir = plan_from_file(config, work / "run", overrides)
    pool = CondorPool()
    pool.own(work)
    pool.start([Path(sys.base_prefix), Path(sys.prefix), REPO, work, out])
    try:
        with embedded_mirrors(run_dir, read_run_config(run_dir / CONFIG_FILE)):
            pool.own(run_dir)
            started = time.perf_counter()
            pool.submit_dag(run_dir / DAG_FILE)
            status = pool.wait_dag(run_dir / DAG_FILE, 1800)
            measured_total = time.perf_counter() - started
    finally:
        pool.stop()
    report = json.loads((run_dir / REPORT_FILE).read_text())
    measured = calibrate(run_dir)
    work_load = plan_workload(load(config, overrides))
    predicted = summarise("pool", simulate(work_load, condor_pool_model(measured), 0), work_load, 4)
    return {
        "case": "test pool (4 slots), sync, [faults] slow node 0 x3",
        "dag_status": status,
        **_compared(measured, report, measured_total, predicted),
    }


def scale(out: Path) -> dict[str, float]:
    """1,000 nodes x 100 rounds on 1,000 machines of the default pool: plan, then simulate."""
    config = out / "scale.toml"
    config.write_text(CONFIG.format(dataset=_dataset(out)))
    pool = pool_for(None, 1000)
    started, cpu = time.perf_counter(), time.process_time()
    work = plan_workload(load(config, ["run.nodes=1000", "run.rounds=100", "run.quorum=0.9"]))
    planned, planned_cpu = time.perf_counter(), time.process_time()
    trace = simulate(work, pool, seed=0)
    simulated, simulated_cpu = time.perf_counter(), time.process_time()
    return {
        "plan_seconds": planned - started,
        "plan_cpu_seconds": planned_cpu - cpu,
        "simulate_seconds": simulated - planned,
        "simulate_cpu_seconds": simulated_cpu - planned_cpu,
        "load_average": os.getloadavg()[0],
        "dag_nodes": len(work.dag.nodes),
        "virtual_hours": trace.end / 3600,
        "jobs_begun": trace.jobs_begun,
        "evictions": trace.evictions,
    }


def _error(predicted: float | None, measured: float | None) -> str:
    if predicted is None or not measured:
        return "-"
    return f"{(predicted - measured) / measured:+.1%}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", type=Path, default=Path("bench_simulate_out"))
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--no-scale", action="store_true")
    parser.add_argument("--pool", action="store_true", help="also a run on tests/condor_pool")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"validation": []}
    cases = [
        lambda n=n: validate(args.out.resolve(), n) for n in filter(None, args.cases.split(","))
    ]
    if args.pool:
        cases.append(lambda: pool_run(args.out.resolve()))
    for case in cases:
        result = case()
        results["validation"].append(result)
        m, p = result["measured"], result["predicted"]
        print(
            f"{result['case']}: wall measured {m['wall_seconds']:.1f} s, predicted "
            f"{p['wall_seconds']:.1f} s ({_error(p['wall_seconds'], m['wall_seconds'])}); "
            f"utilization measured {m['mean_utilization']:.2f}, predicted "
            f"{p['mean_utilization']:.2f} ({_error(p['mean_utilization'], m['mean_utilization'])});"
            f" command {m['command_seconds']:.1f} s, predicted to finish "
            f"{p['seconds_to_finish']:.1f} s "
            f"({_error(p['seconds_to_finish'], m['command_seconds'])})",
            flush=True,
        )
        print("  calibration:", {k: round(v, 3) for k, v in result["calibration"].items()})
    if not args.no_scale:
        results["scale"] = scale(args.out.resolve())
        s = results["scale"]
        print(
            f"scale: {s['dag_nodes']} DAG nodes on 1,000 machines: planned in "
            f"{s['plan_seconds']:.1f} s ({s['plan_cpu_seconds']:.1f} s CPU), simulated in "
            f"{s['simulate_seconds']:.1f} s ({s['simulate_cpu_seconds']:.1f} s CPU; load average "
            f"{s['load_average']:.1f}) "
            f"({s['virtual_hours']:.1f} virtual hours, {s['jobs_begun']} jobs begun, "
            f"{s['evictions']} evictions)"
        )
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
