"""A node's SGD step in channels-last layout (node_payload.train.channels_last) against the
default layout, side by side in one process.

For each architecture: a fresh model per run (batch 32 of 64 px RGB tiles, 6 classes, SGD with
momentum 0.9, one thread), its steps timed after 3 untimed ones, the two layouts alternating
(ABBA) `--pairs` times; the median of the paired ratios is printed, with the load average.

Run:  python benchmarks/bench_train_step.py [--archs smallcnn,resnet18] [--pairs 3] [--steps 20]
"""

import argparse
import contextlib
import os
import statistics
import time

import torch
from torch import nn

from node_payload.common.models import build_model
from node_payload.train import channels_last

BATCH, SIZE, CLASSES = 32, 64, 6


def step_seconds(arch: str, last: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(arch, CLASSES, 3, seed=1).train()
    x, y = torch.randn(BATCH, 3, SIZE, SIZE), torch.randint(0, CLASSES, (BATCH,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    with channels_last(model) if last else contextlib.nullcontext():
        for done in range(3 + steps):
            if done == 3:
                start = time.perf_counter()
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="smallcnn,resnet18")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for arch in args.archs.split(","):
        ratios = []
        for pair in range(args.pairs):
            order = (False, True, True, False) if pair % 2 == 0 else (True, False, False, True)
            times: dict[bool, list[float]] = {False: [], True: []}
            for last in order:
                times[last].append(step_seconds(arch, last, args.steps))
            default, last = statistics.fmean(times[False]), statistics.fmean(times[True])
            ratios.append(last / default)
            load = " ".join(f"{x:.1f}" for x in os.getloadavg())
            print(f"{arch} pair {pair}: default {default * 1e3:.0f} ms a step, channels-last "
                  f"{last * 1e3:.0f} ms ({last / default:.2f}x); load average {load}")  # fmt: skip
        print(f"{arch}: channels-last / default, median of {args.pairs} pairs: "
              f"{statistics.median(ratios):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
