"""Deep Gradient Compression against dense updates on the demo task (synchronous, 4 nodes).

Five runs of the same work: dense float32 updates, DGC at 99% (with and without the warm-up)
and at 99.9% sparsity (warm-up over the first 4 jobs of each lane, error feedback per lane), and
99.9% with DGC's momentum correction (momentum 0.9 on the nodes' accumulated updates). Prints
the bytes the nodes sent per round (update files as the aggregation read them) over the run and
after the warm-up, the ratios to dense, and the final held-out accuracy; writes results.json to
OUT. ROUNDS and LOCAL_STEPS change the demo's 6 x 45 (DGC compresses each job's update, so more,
shorter rounds give error feedback more chances).

Run:  python benchmarks/bench_dgc.py [OUT] [ROUNDS] [LOCAL_STEPS] [SLOTS]
"""

import json
import sys
from pathlib import Path
from typing import Any

from pipeline.demo import run_demo_variant

WARMUP = 4  # [compression] warmup's default: rounds whose sparsity is still rising
VARIANTS: dict[str, dict[str, Any]] = {
    "dense": {"method": "none"},
    "dgc 99%": {"method": "dgc", "sparsity": 0.99},
    "dgc 99%, no warm-up": {"method": "dgc", "sparsity": 0.99, "warmup": 0},
    "dgc 99.9%": {"method": "dgc", "sparsity": 0.999},
    "dgc 99.9%, momentum 0.9": {"method": "dgc", "sparsity": 0.999, "momentum": 0.9},
}


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-dgc").resolve()
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    local_steps = int(sys.argv[3]) if len(sys.argv) > 3 else 45
    slots = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    results: dict[str, Any] = {}
    for name, compression in VARIANTS.items():
        tag = name.replace(",", "").replace(" ", "-").replace("%", "")
        overrides = {
            "run": {"rounds": rounds, "quorum": 1.0},
            "train": {"local_steps": local_steps},
            "compression": compression,
        }
        report = run_demo_variant(out, f"{tag}-{rounds}x{local_steps}", overrides, slots)
        after_warmup = [r["update_bytes"] for r in report["rounds"][WARMUP:]]
        results[name] = {
            "bytes_per_round": report["update_bytes"] / report["rounds_completed"],
            "bytes_per_round_after_warmup": sum(after_warmup) / max(len(after_warmup), 1),
            "final_accuracy": report["final_accuracy"],
            "accuracy": [r["accuracy"] for r in report["rounds"]],
        }
    dense = results["dense"]
    print(f"demo task, 4 nodes x {rounds} rounds x {local_steps} local steps")
    for name, result in results.items():
        ratio = dense["bytes_per_round"] / result["bytes_per_round"]
        steady = dense["bytes_per_round"] / result["bytes_per_round_after_warmup"]
        result["fewer_bytes"] = ratio
        result["fewer_bytes_after_warmup"] = steady
        print(
            f"{name:10s} {result['bytes_per_round'] / 1e3:8.1f} KB per round ({ratio:4.0f}x "
            f"fewer; {steady:4.0f}x after the warm-up), final accuracy "
            f"{result['final_accuracy']:.3f} "
            f"({result['final_accuracy'] - dense['final_accuracy']:+.3f} against dense)"
        )
    (out / f"results-{rounds}x{local_steps}.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
