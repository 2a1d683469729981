"""Update compression against dense updates on the demo task (synchronous, 4 nodes), side by
side in one run: the bytes a node job moves and the accuracy the run reaches.

Variants of the same work: dense float32 updates; DGC at 99% sparsity without warm-up, with the
lanes' residuals in the execute machine's cache (the local runner's slots share one machine, so
every job finds its lane's), and again with every residual lost (`[data] node_cache` relative:
each job's own scratch folder, as if every job landed on a machine its lane never ran on); fp16
and int8 quantised updates with error feedback, int8 also with every residual lost. ROUNDS and
LOCAL_STEPS change the demo's 6 x 45 (error feedback needs rounds: see docs/benchmarks.md).

Per variant, from report.json (node_payload/common/job_bytes.py): the network bytes per node job
besides its training data (model in, payload and config in, update and metrics out) and its
parts, the submit host's bytes per round, the residual misses and the final held-out accuracy;
writes results-ROUNDSxLOCAL_STEPS.json to OUT.

Run:  python benchmarks/bench_dgc.py [OUT] [ROUNDS] [LOCAL_STEPS] [SLOTS]
"""

import json
import sys
from pathlib import Path
from typing import Any

from node_payload.common.job_bytes import JobBytes
from pipeline.demo import run_demo_variant

DGC_99 = {"method": "dgc", "sparsity": 0.99, "warmup": 0}
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "dense": {"compression": {"method": "none"}},
    "dgc 99%": {"compression": DGC_99},
    "dgc 99%, residuals lost": {"compression": DGC_99, "data": {"node_cache": "cache"}},
    "fp16": {"compression": {"method": "fp16"}},
    "int8": {"compression": {"method": "int8"}},
    "int8, residuals lost": {"compression": {"method": "int8"}, "data": {"node_cache": "cache"}},
}


def job_figures(report: dict[str, Any]) -> dict[str, Any]:
    """Per node job: network bytes besides data, and its parts, from the run's byte record."""
    moved = JobBytes.from_json(report["bytes"])
    jobs = sum(r["jobs_counted"] for r in report["rounds"])
    host, mirrors = moved.through_submit_host, moved.from_mirrors
    return {
        "bytes_per_job": report["bytes_per_job"],
        "model_in": (host.model_in + mirrors.model_in) / jobs,
        "payload_in": host.payload_in / jobs,
        "update_out": host.update_out / jobs,
        "metrics_out": host.metrics_out / jobs,
        "residual_over_network": (host.residual_in + host.residual_out) / jobs,
        "residual_on_machine": (moved.on_machine.residual_in + moved.on_machine.residual_out)
        / jobs,
        "submit_host_bytes_per_round": report["submit_host_bytes_per_round"],
        "residual_misses": report["residual_misses"],
        "jobs": jobs,
    }


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-dgc").resolve()
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    local_steps = int(sys.argv[3]) if len(sys.argv) > 3 else 45
    slots = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    cache = str(out / "machine-cache")
    results: dict[str, Any] = {}
    for name, tables in VARIANTS.items():
        tag = name.replace(",", "").replace(" ", "-").replace("%", "")
        overrides = {
            "run": {"rounds": rounds, "quorum": 1.0},
            "train": {"local_steps": local_steps},
            "data": {"node_cache": cache},
        }
        for table, keys in tables.items():
            overrides[table] = overrides.get(table, {}) | keys
        report = run_demo_variant(out, f"{tag}-{rounds}x{local_steps}", overrides, slots)
        results[name] = {**job_figures(report), "final_accuracy": report["final_accuracy"]}
    dense = results["dense"]
    print(f"demo task, 4 nodes x {rounds} rounds x {local_steps} local steps; per node job:")
    for name, r in results.items():
        r["job_bytes_ratio"] = r["bytes_per_job"] / dense["bytes_per_job"]
        r["update_bytes_ratio"] = r["update_out"] / dense["update_out"]
        r["accuracy_points"] = 100 * (r["final_accuracy"] - dense["final_accuracy"])
        print(
            f"{name:24s} {r['bytes_per_job'] / 1e3:7.1f} KB ({r['job_bytes_ratio']:.3f}x dense): "
            f"model {r['model_in'] / 1e3:.1f} KB, payload {r['payload_in'] / 1e3:.1f} KB, "
            f"update {r['update_out'] / 1e3:.1f} KB ({r['update_bytes_ratio']:.4f}x), metrics "
            f"{r['metrics_out'] / 1e3:.1f} KB, residual over the network "
            f"{r['residual_over_network']:.0f} B (on the machine "
            f"{r['residual_on_machine'] / 1e3:.0f} KB); submit host "
            f"{r['submit_host_bytes_per_round'] / 1e3:.0f} KB/round; {r['residual_misses']} "
            f"residual misses; accuracy {r['final_accuracy']:.3f} "
            f"({r['accuracy_points']:+.1f} points)"
        )
    (out / f"results-{rounds}x{local_steps}.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
