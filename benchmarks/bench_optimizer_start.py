"""A fresh node job's way to its first training step: node_payload.sgd.Sgd against
torch.optim.SGD (which imports torch._dynamo as it is built), side by side in one run.

Each measurement is a fresh Python, as a node job on a pool is: it imports torch, builds the
model (`--arch`, 6 classes, 64 px tiles, one thread), then builds the optimizer (SGD with
momentum 0.9) and takes one step of batch 32. Printed per variant, medians over `--rounds`
alternating runs (ABBA order): the seconds from building the optimizer to the end of the first
step, the process's whole wall time and CPU seconds, and the modules it imported; then the
paired ratios (Sgd over torch.optim.SGD) and the load average.

Run:  python benchmarks/bench_optimizer_start.py [--arch smallcnn] [--rounds 6]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("torch.optim.SGD", "Sgd")


def child(arch: str, variant: str) -> None:
    """One measurement, printed as JSON."""
    import torch
    from torch import nn

    from node_payload.common.models import build_model
    from node_payload.sgd import Sgd

    torch.set_num_threads(1)
    model = build_model(arch, 6, 3, seed=1).train()
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 6, (32,))
    start = time.perf_counter()
    if variant == "Sgd":
        optimizer = Sgd(model.parameters(), 0.05, 0.9, False, 0.0)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    print(json.dumps({"first_step": time.perf_counter() - start, "modules": len(sys.modules)}))


def measure(arch: str, variant: str) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--child", arch, variant],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    ).stdout
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {**json.loads(out), "wall": wall, "cpu": cpu}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="smallcnn")
    parser.add_argument("--rounds", type=int, default=6, help="runs of each variant")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    loads = [os.getloadavg()[0]]
    for round_ in range(args.rounds):
        order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            runs[variant].append(measure(args.arch, variant))
        loads.append(os.getloadavg()[0])
    print(f"{args.arch}, {args.rounds} fresh processes each, load {min(loads):.1f} to "
          f"{max(loads):.1f}, medians:")  # fmt: skip
    for variant, results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        print(f"  {variant}: optimizer and first step {med['first_step']:.2f} s; process "
              f"{med['wall']:.2f} s wall, {med['cpu']:.2f} CPU s; {med['modules']:.0f} modules")  # fmt: skip
    for key in ("first_step", "wall", "cpu"):
        ratios = [
            a[key] / b[key] for a, b in zip(runs["Sgd"], runs["torch.optim.SGD"], strict=True)
        ]
        print(f"  Sgd / torch.optim.SGD, {key}: median {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f} to {max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
