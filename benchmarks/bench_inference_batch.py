"""Rows per forward pass when scoring: the batch heldout_metrics.batch_size_for picks against
batches of 64, side by side in one run.

For each network and tile size: an untrained model's inference_copy (what predict, evaluate and
the held-out evaluation score with; untrained weights cost the same as trained ones) scores the
same random fragments in batches of 64 and in the picked batch, alternating (ABBA) `--reps`
times; printed: the picked batch, the largest activation of one fragment, the milliseconds per
fragment of each (medians) and the median of the paired ratios (picked / 64), with the load
average. One thread (`--threads`), as a slot gives the aggregation job. With `--scan`, also
every batch size from 1 to 64 (powers of 2; the best of `--reps` passes each), to see how far
the picked batch is from the fastest.

Run:  python benchmarks/bench_inference_batch.py [--archs smallcnn,resnet18,mobilenet_v3_small]
      [--tiles 64,128,256] [--reps 3] [--threads 1] [--scan]
"""

import argparse
import os
import statistics
import time

import torch

from aggregation.heldout_metrics import ACTIVATION_BUDGET, batch_size_for, inference_copy, logits
from node_payload.common.models import build_model

SCAN = (1, 2, 4, 8, 16, 32, 64)
FRAGMENT_BYTES = 128 << 20  # float32 input per measurement, so a pass lasts long enough to time


def seconds(fast: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    started = time.perf_counter()
    logits(fast, x, 6, batch)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="smallcnn,resnet18,mobilenet_v3_small")
    parser.add_argument("--tiles", default="64,128,256")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scan", action="store_true", help="also time batches of 1 to 64")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"activation budget {ACTIVATION_BUDGET >> 20} MiB, {args.threads} thread(s)")
    for arch in args.archs.split(","):
        fast = inference_copy(build_model(arch, 6, 3, seed=1))
        for tile in map(int, args.tiles.split(",")):
            n = max(64, FRAGMENT_BYTES // (3 * tile * tile * 4) // 64 * 64)
            x = torch.rand(n, 3, tile, tile, generator=torch.Generator().manual_seed(0))
            picked = batch_size_for(fast, (3, tile, tile))
            seconds(fast, x[:64], 64)  # first passes: allocations, kernels chosen
            seconds(fast, x[:picked], picked)
            loads, times = [os.getloadavg()[0]], {64: [], picked: []}
            for rep in range(args.reps):
                for batch in (64, picked) if rep % 2 == 0 else (picked, 64):
                    times[batch].append(seconds(fast, x, batch))
            loads.append(os.getloadavg()[0])
            ratios = [p / b for p, b in zip(times[picked], times[64], strict=True)]
            each = {b: 1000 * statistics.median(t) / n for b, t in times.items()}
            print(f"{arch} {tile} px ({n} fragments, load {min(loads):.1f} to {max(loads):.1f}): "
                  f"picks {picked}; 64: {each[64]:.2f} ms a fragment, {picked}: "
                  f"{each[picked]:.2f} ms; ratio {statistics.median(ratios):.2f}", flush=True)  # fmt: skip
            if args.scan:
                scan = {b: min(seconds(fast, x, b) for _ in range(args.reps)) for b in SCAN}
                print("  ms a fragment by batch: " + ", ".join(
                    f"{b}: {1000 * t / n:.2f}" for b, t in scan.items()), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
