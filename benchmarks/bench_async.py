"""Synchronous against asynchronous training on the demo task with node speeds 1, 1, 2, 4.

Five runs of the same work (4 nodes or lanes, 24 updates) on the local runner, the slow nodes
slowed by [faults] slow (factors 4, 4, 2, 1): synchronous; asynchronous with its defaults
(FedAsync, each update at once, mixing weight [server] lr 0.6 falling as a cosine over the
versions), buffered (FedBuff, K = 2); and for reference a constant mixing weight of 0.6 and of 1.
Prints each run's wall time, final held-out accuracy and the time it first reached the
synchronous run's final accuracy; writes results.json and accuracy_vs_time.png to OUT.

Run:  python benchmarks/bench_async.py [OUT] [SLOTS]
"""

import json
import sys
from pathlib import Path
from typing import Any

from pipeline.demo import run_demo_variant

SLOW = [[0, 4.0], [1, 4.0], [2, 2.0]]  # speeds 1, 1, 2, 4 relative to node 3
VARIANTS: dict[str, dict[str, Any]] = {
    "sync": {"run": {"quorum": 1.0}},
    "async": {"run": {"mode": "async"}},
    "async, buffer 2": {"run": {"mode": "async"}, "async": {"buffer": 2}},
    "async, constant mixing": {"run": {"mode": "async"}, "async": {"mixing_schedule": "constant"}},
    "async, lr 1, constant": {
        "run": {"mode": "async"},
        "server": {"lr": 1.0},
        "async": {"mixing_schedule": "constant"},
    },
}


def _curve(report: dict[str, Any]) -> list[tuple[float, float]]:
    """(seconds since the first job started, held-out accuracy) after each round or version."""
    if report.get("mode") == "async":
        return [(e["seconds"], e["accuracy"]) for e in report["evaluations"]]
    start = min(r["started_at"] for r in report["rounds"])
    return [(r["started_at"] + r["seconds"] - start, r["accuracy"]) for r in report["rounds"]]


def _reached(curve: list[tuple[float, float]], accuracy: float) -> float | None:
    return next((t for t, a in curve if a >= accuracy), None)


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    for name, result in results.items():
        times, accuracy = zip(*result["curve"], strict=True)
        axis.plot(times, accuracy, marker=".", label=name)
    axis.set_xlabel("wall time (s)")
    axis.set_ylabel("held-out accuracy")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title("demo task, node speeds 1, 1, 2, 4")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-async").resolve()
    slots = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    results: dict[str, Any] = {}
    for name, variant in VARIANTS.items():
        overrides = {
            **variant,
            "faults": {"slow": SLOW},
            "async": {"evaluations": 100, **variant.get("async", {})},
        }
        dirname = name.replace(", ", "-").replace(" ", "_")
        report = run_demo_variant(out, dirname, overrides, slots)
        results[name] = {
            "wall_seconds": report["wall_seconds"],
            "final_accuracy": report["final_accuracy"],
            "mean_utilization": report["mean_utilization"],
            "curve": _curve(report),
        }
    target = results["sync"]["final_accuracy"]
    base = results["sync"]["wall_seconds"]
    print(f"synchronous final accuracy {target:.3f} after {base:.0f} s ({slots} slots)")
    for name, result in results.items():
        reached = _reached(result["curve"], target)
        result["reached_sync_accuracy_s"] = reached
        share = f"{reached / base:.2f} of sync" if reached is not None else "never"
        print(
            f"{name:18s} wall {result['wall_seconds']:6.0f} s, final accuracy "
            f"{result['final_accuracy']:.3f}, utilization {result['mean_utilization']:.2f}, "
            f"reached {target:.3f}: {share}"
        )
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    _plot(results, out / "accuracy_vs_time.png")


if __name__ == "__main__":
    main()
