"""The local runner's warm interpreters against fresh processes, side by side in one run.

Run:  python benchmarks/bench_warm_runner.py [--slots 2] [--jobs 12] [--pairs 2] [--skip-demo]
      [--warm-first]

1. Start-up: JOBS payload jobs (the payload's imports, then a fixed torch workload), through
   the local runner, cold and warm in turn, PAIRS times: the slot seconds a job costs, its
   time beyond its work, its work (the same warm or cold?), and the warm server's resident
   memory (what a second server, one per slot, would cost again).
2. The demo (`dagtrain demo`'s config and dataset), planned twice and run once cold and once
   warm: wall time, node utilization (busy training seconds, the node jobs' metrics.json
   `seconds`, over slots x wall seconds) and whether both runs wrote the same model bytes.
"""

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from node_payload.common.run_layout import METRICS_FILE, MODELS_DIR, ROUNDS_DIR
from pipeline import planner
from pipeline.demo import DEMO_CONFIG, demo_textures
from pipeline.local_run import run_local
from pipeline.local_runner import NodeEvent, run_dag

# A payload job: the payload's imports, then a fixed piece of torch work, timed in the job.
PROBE_MAIN = """
import json, os, sys, time
import numpy, safetensors.torch, torch
x = torch.randn(32, 3, 64, 64)
w = torch.randn(24, 3, 3, 3, requires_grad=True)
started = time.perf_counter()
for _ in range(20):
    torch.nn.functional.conv2d(x, w, padding=1).relu().sum().backward()
work = time.perf_counter() - started
status = open(f"/proc/{os.getppid()}/status").read()
rss = [line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")]
open(sys.argv[1], "w").write(json.dumps({"work": work, "parent_kb": int(rss[0])}))
"""

PROBE_SUBMIT = """\
universe = vanilla
executable = {python}
transfer_executable = false
arguments = "dagtrain.pyz $(name).json"
should_transfer_files = YES
transfer_input_files = dagtrain.pyz
transfer_output_files = $(name).json
request_cpus = 1
log = $(name).log
output = $(name).out
error = $(name).err
queue
"""


def startup(jobs: int, slots: int, warm: bool) -> dict[str, float]:
    """Slot seconds per job (a warm server's start included); per job, the median of its
    time from start to end less its work (what a job costs beyond its work, once a warm server
    is ready) and of its work; the parent's resident memory (the warm server's when warm)."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        with zipfile.ZipFile(base / "dagtrain.pyz", "w") as archive:
            archive.writestr("__main__.py", PROBE_MAIN)
        (base / "probe.sub").write_text(PROBE_SUBMIT.format(python=sys.executable))
        lines = [f'JOB j{i} probe.sub\nVARS j{i} name="j{i}"' for i in range(jobs)]
        (base / "probe.dag").write_text("\n".join(lines) + "\n")
        events: list[NodeEvent] = []
        started = time.perf_counter()
        result = run_dag(
            base / "probe.dag",
            slots=slots,
            on_event=events.append,
            warm_pythons=[sys.executable] if warm else (),
        )
        seconds = time.perf_counter() - started
        assert result.ok, result
        seen = {f"j{i}": json.loads((base / f"j{i}.json").read_text()) for i in range(jobs)}
        began = {e.node: e.time for e in events if e.kind == "running"}
        ended = {e.node: e.time for e in events if e.kind == "done"}
        return {
            "slot_s": seconds * slots / jobs,
            "overhead_s": statistics.median(ended[n] - began[n] - seen[n]["work"] for n in seen),
            "work_s": statistics.median(job["work"] for job in seen.values()),
            "parent_mb": seen[f"j{jobs - 1}"]["parent_kb"] / 1024,
        }


def demo_run(base: Path, name: str, slots: int, warm: bool) -> dict:
    run_dir = base / name
    planner.plan_from_file(base / "demo.toml", run_dir)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    report = run_local(run_dir, slots=slots, show_progress=False, warm=warm)
    wall = time.perf_counter() - started
    load = (load, os.getloadavg()[0])
    busy = sum(
        json.loads(p.read_text())["seconds"]
        for p in (run_dir / ROUNDS_DIR).glob(f"*/*/{METRICS_FILE}")
    )
    models = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((run_dir / MODELS_DIR).glob("*.safetensors"))
    }
    return {"wall": wall, "busy": busy, "util": busy / (slots * wall), "models": models,
            "accuracy": report["final_accuracy"], "status": report["status"], "load": load}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--pairs", type=int, default=2, help="probe runs of each (default 2)")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument(
        "--warm-first", dest="order", action="store_const", const=("warm", "cold"),
        default=("cold", "warm"), help="warm runs first (default: cold first)",
    )  # fmt: skip
    args = parser.parse_args()

    probes: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    for _ in range(args.pairs):  # alternating, so that both see the same load
        for name in args.order:
            probes[name].append(startup(args.jobs, args.slots, warm=name == "warm"))
    print(f"payload jobs (imports, then a fixed torch workload), {args.jobs} per run, "
          f"{args.slots} slots, {args.pairs} runs each, medians:")  # fmt: skip
    for name, runs in probes.items():
        med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        server = f"; the server resident {med['parent_mb']:.0f} MB" if name == "warm" else ""
        print(f"  {name}: {med['slot_s']:.2f} s of slot time per job, {med['overhead_s']:.2f} s "
              f"from start to end beyond the work, work {med['work_s']:.2f} s{server}")  # fmt: skip
    if args.skip_demo:
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        demo_textures(base)
        (base / "demo.toml").write_text(DEMO_CONFIG)
        runs = {name: demo_run(base, name, args.slots, name == "warm") for name in args.order}
    for name, run in runs.items():
        print(f"demo {name}: {run['wall']:.0f} s wall, {run['busy']:.0f} s busy training, "
              f"utilization {run['util']:.2f}, final accuracy {run['accuracy']:.3f}, "
              f"{run['status']} (load average {run['load'][0]:.1f} at its start, "
              f"{run['load'][1]:.1f} at its end)")  # fmt: skip
    cold, warm = runs["cold"], runs["warm"]
    print(f"warm/cold wall time {warm['wall'] / cold['wall']:.2f}; same model bytes: "
          f"{warm['models'] == cold['models']} ({len(warm['models'])} models)")  # fmt: skip


if __name__ == "__main__":
    main()
