"""The local runner's warm interpreters against fresh processes, side by side in one run.

Run:  python benchmarks/bench_warm_runner.py [--slots 2] [--jobs 12] [--pairs 2] [--skip-probe]
      [--demo-pairs 2] [--rounds 3] [--skip-demo]

The machine is shared, so its load moves between runs: runs go in ABBA order (cold, warm, warm,
cold, cold, warm, ...), each pair's warm/cold ratio is taken, and the median of those ratios is
reported, with each run's load average (sampled every 2 s) beside it. CPU seconds (the runner's
own and its children's, the warm server's children included, from getrusage) move far less with
the load than wall time on 2 cores, so their ratio is reported too.

1. Start-up: JOBS payload jobs (the payload's imports, then a fixed torch workload), through
   the local runner: the slot seconds a job costs, its time beyond its work, its work (the same
   warm or cold?), and the warm server's resident memory (what a second server would cost).
2. The demo (`dagtrain demo`'s config and dataset, ROUNDS rounds instead of 6: the same node
   jobs, 4 per round, and the same aggregation), planned afresh for every run: wall time, CPU
   seconds, node utilization (busy training seconds, the node jobs' metrics.json `seconds`,
   over slots x wall seconds), where the slot time went, and whether all runs wrote the same
   model bytes.
3. The aggregation's held-out evaluation, on the last demo run's held-out tensors and final
   model: the model scored as it is (eval mode, batches of 256) against its inference_copy (what
   the aggregation scores), on 1 and on 2 threads (the aggregation job's request_cpus), pairs in
   ABBA order: medians of wall and CPU seconds, and whether both give the same predictions.
4. With --cpus-pairs N: warm demo runs whose aggregation job requests 2 CPUs (two threads, which
   the local runner grants; a pool never starts a local-universe job asking for more than one)
   against the planned one, N ABBA pairs: utilization, wall time and the aggregations' slot
   seconds, and the median of the paired wall time ratios.
"""

import argparse
import hashlib
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

import pipeline.local_run
from aggregation.heldout_metrics import inference_copy, logits
from node_payload.common.model_file import load_model
from node_payload.common.run_layout import (
    AGGREGATE_SUBMIT,
    HELDOUT_CACHE,
    HELDOUT_IMAGES_CACHE,
    METRICS_FILE,
    MODELS_DIR,
    ROUNDS_DIR,
    model_path,
)
from node_payload.common.tensor_io import load_tensors
from pipeline import planner
from pipeline.demo import DEMO_CONFIG, demo_textures
from pipeline.local_run import run_local
from pipeline.local_runner import NodeEvent, run_dag

MODES = ("cold", "warm")

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


def abba(pairs: int, modes: tuple[str, str] = MODES) -> Iterator[tuple[int, str]]:
    """(pair, mode) in ABBA order, so that a trend in the load favours neither mode."""
    for pair in range(pairs):
        yield from ((pair, mode) for mode in (modes if pair % 2 == 0 else modes[::-1]))


class Measured:
    """Wall and CPU seconds of what runs inside it (this process and every child it reaped),
    and the 1-minute load average sampled every 2 s meanwhile."""

    def __enter__(self) -> "Measured":
        self.loads = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        self._cpu = _cpu_seconds()
        self.started = time.time()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(2.0):
            self.loads.append(os.getloadavg()[0])

    def __exit__(self, *_: object) -> None:
        self.wall = time.time() - self.started
        self.cpu = _cpu_seconds() - self._cpu
        self._stop.set()
        self._sampler.join()
        self.loads.append(os.getloadavg()[0])

    def load(self) -> str:
        return f"{statistics.mean(self.loads):.1f} ({min(self.loads):.1f} to {max(self.loads):.1f})"


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


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
        with Measured() as measured:
            result = run_dag(
                base / "probe.dag",
                slots=slots,
                on_event=events.append,
                warm_pythons=[sys.executable] if warm else (),
            )
        assert result.ok, result
        seen = {f"j{i}": json.loads((base / f"j{i}.json").read_text()) for i in range(jobs)}
        began = {e.node: e.time for e in events if e.kind == "running"}
        ended = {e.node: e.time for e in events if e.kind == "done"}
        return {
            "slot_s": measured.wall * slots / jobs,
            "cpu_s": measured.cpu / jobs,
            "overhead_s": statistics.median(ended[n] - began[n] - seen[n]["work"] for n in seen),
            "work_s": statistics.median(job["work"] for job in seen.values()),
            "parent_mb": seen[f"j{jobs - 1}"]["parent_kb"] / 1024,
        }


@contextmanager
def recorded_events(events: list[NodeEvent]) -> Iterator[None]:
    """The local runner's node events of run_local, as its progress display gets them."""
    original = pipeline.local_run.run_dag

    def run_dag_recording(*args: object, on_event: Callable[[NodeEvent], None], **kw: object):
        def both(event: NodeEvent) -> None:
            events.append(event)
            on_event(event)

        return original(*args, on_event=both, **kw)  # type: ignore[arg-type]

    pipeline.local_run.run_dag = run_dag_recording  # type: ignore[assignment]
    try:
        yield
    finally:
        pipeline.local_run.run_dag = original


def demo_run(base: Path, name: str, slots: int, warm: bool, aggregate_cpus: int = 0) -> dict:
    """One planned demo run, measured, with where its slot seconds went; `aggregate_cpus`: the
    request_cpus added to the aggregation job's submit file."""
    run_dir = base / name
    planner.plan_from_file(base / "demo.toml", run_dir)
    if aggregate_cpus:
        submit = run_dir / AGGREGATE_SUBMIT
        text = submit.read_text()
        assert "request_cpus" not in text and text.endswith("queue\n"), text
        submit.write_text(
            text.removesuffix("queue\n") + f"request_cpus = {aggregate_cpus}\nqueue\n"
        )
    events: list[NodeEvent] = []
    with recorded_events(events), Measured() as measured:
        report = run_local(run_dir, slots=slots, show_progress=False, warm=warm)
    rounds = run_dir / ROUNDS_DIR
    metrics = {  # by node name: train_rRRR_nNNN
        "_".join(("train", *p.parent.relative_to(rounds).parts)): json.loads(p.read_text())
        for p in rounds.glob(f"*/*/{METRICS_FILE}")
    }
    busy = sum(m["seconds"] for m in metrics.values())
    submitted = {e.node: e.time for e in events if e.kind == "submitted"}  # the last attempt's
    running = {e.node: e.time for e in events if e.kind == "running"}
    done = {e.node: e.time for e in events if e.kind == "done"}
    # In a slot before a job runs: its input files copied, its process started (warm: once the
    # server has imported torch, which the first jobs wait for).
    starting = sum(running[n] - submitted[n] for n in running)
    # Node job start-up: from its process starting to the job's own clock starting (imports).
    start_up = sum(m["started_at"] - running[node] for node, m in metrics.items())
    # Aggregations and the report: the whole job (their POST scripts included).
    others = sum(done[n] - running[n] for n in done if not n.startswith("train_"))
    models = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((run_dir / MODELS_DIR).glob("*.safetensors"))
    }
    return {
        "wall": measured.wall, "cpu": measured.cpu, "load": measured.load(), "busy": busy,
        "util": busy / (slots * measured.wall), "starting": starting, "start_up": start_up,
        "aggregation": others, "models": models,
        "other": slots * measured.wall - busy - starting - start_up - others,
        "accuracy": report["final_accuracy"], "status": report["status"],
    }  # fmt: skip


@torch.no_grad()
def plain_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference: the model itself in eval mode, batches of 256."""
    model.eval()
    return torch.cat([model(x[start : start + 256]) for start in range(0, len(x), 256)])


def evaluation(run_dir: Path, rounds: int, pairs: int) -> None:
    """Step 3: the held-out evaluation's forward passes, plain and through inference_copy."""
    model, metadata = load_model(model_path(run_dir, rounds))
    inputs = [
        load_tensors(run_dir / name)[0]["x"] for name in (HELDOUT_CACHE, HELDOUT_IMAGES_CACHE)
    ]
    classes = int(metadata["num_classes"])
    score = {
        "plain": lambda: [plain_logits(model, x) for x in inputs],
        "copy": lambda: [logits(inference_copy(model), x, classes) for x in inputs],
    }
    print(f"held-out evaluation ({' + '.join(str(len(x)) for x in inputs)} fragments, the "
          f"final model), {pairs} ABBA pairs, medians:")  # fmt: skip
    for threads in (1, 2):
        torch.set_num_threads(threads)
        seconds: dict[str, list[tuple[float, float]]] = {mode: [] for mode in score}
        outputs = {}
        for _, mode in abba(pairs, ("plain", "copy")):
            wall, cpu = time.perf_counter(), time.process_time()
            outputs[mode] = score[mode]()
            seconds[mode].append((time.perf_counter() - wall, time.process_time() - cpu))
        med = {
            m: [statistics.median(s[i] for s in runs) for i in (0, 1)]
            for m, runs in seconds.items()
        }
        same = all(
            torch.equal(a.argmax(dim=1), b.argmax(dim=1))
            for a, b in zip(outputs["plain"], outputs["copy"], strict=True)
        )
        largest = max(
            float((a - b).abs().max())
            for a, b in zip(outputs["plain"], outputs["copy"], strict=True)
        )
        print(f"  {threads} thread(s), load {os.getloadavg()[0]:.1f}: plain {med['plain'][0]:.2f} s "
              f"wall, {med['plain'][1]:.2f} CPU s; inference_copy {med['copy'][0]:.2f} s, "
              f"{med['copy'][1]:.2f} CPU s (wall {med['copy'][0] / med['plain'][0]:.2f}x); "
              f"same predictions: {same}, logits within {largest:.1e}")  # fmt: skip


def aggregation_threads(base: Path, slots: int, rounds: int, pairs: int) -> None:
    """Step 4: warm demo runs, the aggregation on two threads against the planned one."""
    runs = {}
    for pair, mode in abba(pairs, ("2 CPUs", "1 CPU")):
        cpus = 2 if mode == "2 CPUs" else 0
        run = runs[pair, mode] = demo_run(base, f"cpus{pair}{cpus}", slots, True, cpus)
        print(f"demo warm, aggregation {mode} (pair {pair}): {run['wall']:.0f} s wall, load "
              f"{run['load']}; utilization {run['util']:.2f}, aggregations and report "
              f"{run['aggregation']:.1f} slot s", flush=True)  # fmt: skip
    ratios = [runs[pair, "2 CPUs"]["wall"] / runs[pair, "1 CPU"]["wall"] for pair in range(pairs)]
    print(f"  2 CPUs/1 CPU wall time: median {statistics.median(ratios):.2f} "
          f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip


def paired_ratios(runs: dict[tuple[int, str], dict], key: str) -> list[float]:
    pairs = sorted({pair for pair, _ in runs})
    return [runs[pair, "warm"][key] / runs[pair, "cold"][key] for pair in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--pairs", type=int, default=2, help="probe runs of each (default 2)")
    parser.add_argument("--skip-probe", action="store_true")
    parser.add_argument("--demo-pairs", type=int, default=2, help="demo runs of each (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="demo rounds (the demo: 6)")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument(
        "--eval-pairs", type=int, default=5, help="evaluation pairs (default 5; 0: none)"
    )
    parser.add_argument("--cpus-pairs", type=int, default=0, help="step 4's pairs (default 0)")
    args = parser.parse_args()

    if not args.skip_probe:
        probes: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        for _, mode in abba(args.pairs):
            probes[mode].append(startup(args.jobs, args.slots, warm=mode == "warm"))
        print(f"payload jobs (imports, then a fixed torch workload), {args.jobs} per run, "
              f"{args.slots} slots, {args.pairs} runs each, medians:")  # fmt: skip
        for mode, runs in probes.items():
            med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            server = f"; the server resident {med['parent_mb']:.0f} MB" if mode == "warm" else ""
            print(f"  {mode}: {med['slot_s']:.2f} s of slot time and {med['cpu_s']:.2f} CPU s per "
                  f"job, {med['overhead_s']:.2f} s from start to end beyond the work, work "
                  f"{med['work_s']:.2f} s{server}")  # fmt: skip
    if args.skip_demo:
        return
    runs: dict[tuple[int, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        demo_textures(base)
        (base / "demo.toml").write_text(
            DEMO_CONFIG.replace("rounds = 6", f"rounds = {args.rounds}")
        )
        for pair, mode in abba(args.demo_pairs):
            run = runs[pair, mode] = demo_run(base, f"{mode}{pair}", args.slots, mode == "warm")
            print(f"demo {mode} (pair {pair}): {run['wall']:.0f} s wall, {run['cpu']:.0f} CPU s, "
                  f"load {run['load']}; {run['busy']:.0f} s busy training, utilization "
                  f"{run['util']:.2f}; other slot seconds: jobs starting {run['starting']:.0f}, "
                  f"node job imports {run['start_up']:.0f}, "
                  f"aggregations and report {run['aggregation']:.0f}, idle and between jobs "
                  f"{run['other']:.0f}; accuracy {run['accuracy']:.3f}, {run['status']}",
                  flush=True)  # fmt: skip
        if args.eval_pairs:
            evaluation(base / f"{mode}{pair}", args.rounds, args.eval_pairs)
        if args.cpus_pairs:
            aggregation_threads(base, args.slots, args.rounds, args.cpus_pairs)
    print(
        f"demo ({args.rounds} rounds x 4 nodes, {args.slots} slots), {args.demo_pairs} ABBA pairs:"
    )
    for key, what in (("wall", "wall time"), ("cpu", "CPU seconds")):
        ratios = paired_ratios(runs, key)
        print(f"  warm/cold {what}: median {statistics.median(ratios):.2f} "
              f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
    for mode in MODES:
        utils = [run["util"] for (_, m), run in runs.items() if m == mode]
        print(f"  {mode} utilization: median {statistics.median(utils):.2f}")
    models = [run["models"] for run in runs.values()]
    same = all(m == models[0] for m in models)
    print(f"  same model bytes in every run: {same} ({len(models[0])} models)")


if __name__ == "__main__":
    main()
