"""Local-runner overhead per job: a DAG of no-op jobs, timed end to end.

Run:  python benchmarks/bench_local_runner.py [JOBS] [SLOTS]
"""

import sys
import tempfile
import time
from pathlib import Path

from pipeline.local_runner import run_dag

SUBMIT = """\
universe = vanilla
executable = /bin/true
transfer_executable = false
should_transfer_files = YES
when_to_transfer_output = ON_EXIT
log = $(name).log
output = $(name).out
error = $(name).err
queue
"""


def main() -> None:
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    slots = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "noop.sub").write_text(SUBMIT)
        lines = [f'JOB j{i} noop.sub\nVARS j{i} name="j{i}"' for i in range(jobs)]
        (base / "noop.dag").write_text("\n".join(lines) + "\n")
        started = time.perf_counter()
        result = run_dag(base / "noop.dag", slots=slots)
        seconds = time.perf_counter() - started
    assert result.ok
    print(f"{jobs} no-op jobs, {slots} slots: {seconds:.2f} s")
    print(
        f"overhead per job: {seconds / jobs * 1000:.1f} ms wall, {seconds * slots / jobs * 1000:.1f} ms slot time"
    )


if __name__ == "__main__":
    main()
