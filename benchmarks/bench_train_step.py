"""A node's training steps in channels-last layout (node_payload.train.channels_last) and with
freed memory kept (node_payload.common.heap), against the defaults, side by side in one run.

Each measurement is a fresh process, as each node job is (a fork of the warm interpreter, or a
new Python on a pool): it builds the model (batch 32 of 64 px RGB tiles drawn from 480, 6 classes,
SGD with momentum 0.9, one thread) and times `--steps` steps after 3 untimed ones, in wall time,
CPU time (user and system) and minor page faults. The four variants (layout x heap) run in a
rotating order `--rounds` times; medians per variant are printed, and the ratios to the
defaults, with the load average.

Run:  python benchmarks/bench_train_step.py [--archs smallcnn,resnet18] [--rounds 4] [--steps 20]
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("default", "channels-last", "heap kept", "both")
BATCH, SIZE, CLASSES, SAMPLES = 32, 64, 6, 480


def child(arch: str, variant: str, steps: int) -> None:
    """One measurement, printed as JSON."""
    from node_payload.common.heap import keep_freed_memory

    if variant in ("heap kept", "both"):
        keep_freed_memory()
    import torch
    from torch import nn

    from node_payload.common.models import build_model
    from node_payload.sgd import Sgd
    from node_payload.train import channels_last

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(arch, CLASSES, 3, seed=1).train()
    x, y = torch.randn(SAMPLES, 3, SIZE, SIZE), torch.randint(0, CLASSES, (SAMPLES,))
    optimizer = Sgd(model.parameters(), 0.05, 0.9, False, 0.0)
    loss_fn = nn.CrossEntropyLoss()
    layout = channels_last(model) if variant in ("channels-last", "both") else None
    with layout or contextlib.nullcontext():
        for done in range(3 + steps):
            if done == 3:
                start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            index = torch.randint(0, SAMPLES, (BATCH,))
            loss = loss_fn(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    faults = after.ru_minflt - before.ru_minflt
    print(json.dumps({"wall": wall / steps, "cpu": cpu / steps, "faults": faults / steps}))


def measure(arch: str, variant: str, steps: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", arch, variant, str(steps)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="smallcnn,resnet18")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    for arch in args.archs.split(","):
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
        for turn in range(args.rounds):
            for variant in VARIANTS[turn % 4 :] + VARIANTS[: turn % 4]:
                runs[variant].append(measure(arch, variant, args.steps))
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        base = {k: statistics.median(r[k] for r in runs["default"]) for k in ("wall", "cpu")}
        print(f"{arch}, medians of {args.rounds} runs of {args.steps} steps (load {load}):")
        for variant, results in runs.items():
            wall, cpu, faults = (
                statistics.median(r[k] for r in results) for k in ("wall", "cpu", "faults")
            )
            print(f"  {variant}: {wall * 1e3:.0f} ms a step ({wall / base['wall']:.2f}x), "
                  f"{cpu * 1e3:.0f} CPU ms ({cpu / base['cpu']:.2f}x), {faults:.0f} page faults "
                  "a step")  # fmt: skip


if __name__ == "__main__":
    main()
