"""Planner time and run-directory size for a 1,000-node x 100-round synchronous DAG.

Run:  python benchmarks/bench_planner.py [NODES ROUNDS]
"""

import os
import sys
import tempfile
import time
from pathlib import Path

from pipeline import config
from pipeline.dataset_prepare import prepare
from pipeline.planner import make_plan, write
from pipeline.textures import generate


def _size(path: Path) -> tuple[int, int]:
    total, files = 0, 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            total += (Path(root) / name).stat().st_size
            files += 1
    return total, files


def main() -> None:
    nodes, rounds = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) == 3 else (1000, 100)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        source = generate(base / "src", classes=4, images_per_class=4, size=128, progress=False)
        prepare(source, base / "dataset", tile=32, overlap=0.5, holdout=0.25, progress=False)
        cfg = config.from_dict(
            {
                "run": {"nodes": nodes, "rounds": rounds},
                "data": {
                    "dataset": str(base / "dataset"),
                    "local_train": 48,
                    "local_test": 16,
                    "heldout_test": 64,
                },
            },
            base_dir=base,
        )
        started = time.perf_counter()
        plan = make_plan(cfg)
        planned = time.perf_counter()
        run_dir = write(plan, base / "run")
        written = time.perf_counter()
        dag_bytes = (run_dir / "dagtrain.dag").stat().st_size
        total, files = _size(run_dir)
    print(f"{nodes} nodes x {rounds} rounds = {nodes * rounds + rounds} DAG jobs")
    print(f"plan (resolve, seeds, held-out set): {planned - started:.2f} s")
    print(f"write (render DAG + submit files, node folders): {written - planned:.2f} s")
    print(
        f"DAG file: {dag_bytes / 1e6:.1f} MB; run directory: {total / 1e6:.1f} MB in {files} files"
    )


if __name__ == "__main__":
    main()
