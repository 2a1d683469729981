"""The one-command demo, timed: wall time and final held-out accuracy from a clean folder.

As `dagtrain demo` runs it: payload jobs start in the local runner's warm interpreter. The demo
against fresh processes (`dagtrain run --cold`) is benchmarks/bench_warm_runner.py.

Run:  python benchmarks/bench_demo.py [SLOTS]
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.demo import run_demo


def main() -> None:
    slots = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        report = run_demo(Path(tmp) / "demo", slots=slots)
        seconds = time.perf_counter() - started
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    print(f"demo on {cores} cores, {slots} slots: {seconds:.0f} s wall, status {report['status']}")
    print(f"final held-out accuracy {report['final_accuracy']:.3f}")
    print("per round:", ", ".join(f"{r['accuracy']:.3f}" for r in report["rounds"]))


if __name__ == "__main__":
    main()
