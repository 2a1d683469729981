"""Update compression against dense updates on the demo task (synchronous, 4 nodes), side by
side in one run: the bytes a node job moves and the accuracy the run reaches.

Variants of the same work: dense float32 updates; DGC at 99% sparsity without warm-up, with the
machine cache (`[data] node_cache`: the lanes' residuals, the last global model, the job
payload) kept (the local runner's slots share one machine, so every job finds them), and again
with the machine cache lost (`node_cache` relative: each job's own scratch folder, as if every
job landed on a machine none of its run's jobs ran on); fp16 and int8 quantised updates with
error feedback; and DGC 99% with server momentum 0.9, to show what momentum does to the model's
delta. ROUNDS and LOCAL_STEPS change the demo's 6 x 45 (error feedback needs rounds: see
docs/benchmarks.md).

Per variant, from report.json (node_payload/common/job_bytes.py): the network bytes per node job
besides its training data (model or its delta in, payload's launcher and config in, update and
metrics out) and its parts, the submit host's bytes per round, the jobs that fetched their
model whole although a delta was published and those that started without their residual, the
final held-out accuracy; and from the run's models, how many of the model's values changed from
one version to the next (the delta's density) and the delta's size. With --seeds, every variant
runs once per `[run] seed` (its held-out split, data draws and initial model), in OUT/seedN, and
its accuracy is their mean, with each seed's beside it; the bytes are the first seed's. Writes
results-ROUNDSxLOCAL_STEPS.json to OUT.

Run:  python benchmarks/bench_dgc.py [OUT] [ROUNDS] [LOCAL_STEPS] [SLOTS] [--seeds 1,2]
          [--variants "dense,dgc 99%"]
"""

import argparse
import json
import tempfile
from pathlib import Path
from statistics import fmean
from typing import Any

from node_payload.common.job_bytes import JobBytes
from node_payload.common.model_delta import DeltaIdentity, write_delta
from node_payload.common.run_layout import model_path
from node_payload.common.tensor_io import load_tensors
from pipeline.demo import run_demo_variant

DGC_99 = {"method": "dgc", "sparsity": 0.99, "warmup": 0}
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "dense": {"compression": {"method": "none"}},
    "dgc 99%": {"compression": DGC_99},
    "dgc 99%, machine cache lost": {"compression": DGC_99, "data": {"node_cache": "cache"}},
    "fp16": {"compression": {"method": "fp16"}},
    "int8": {"compression": {"method": "int8"}},
    "dgc 99%, server momentum 0.9": {"compression": DGC_99, "server": {"momentum": 0.9}},
    "dgc 99%, momentum 0.9": {"compression": DGC_99 | {"momentum": 0.9}},
    "dgc 99%, warm-up 1": {"compression": DGC_99 | {"warmup": 1}},
}


def variant_names(arg: str) -> list[str]:
    """The variants named in a comma-separated list whose names may hold commas themselves
    ("dgc 99%, machine cache lost"): at each place, the longest run of parts that is a name."""
    parts, names, start = arg.split(","), [], 0
    while start < len(parts):
        for end in range(len(parts), start, -1):
            name = ",".join(parts[start:end]).strip()
            if name in VARIANTS:
                names.append(name)
                start = end
                break
        else:
            raise SystemExit(f"--variants: no variant starts at {','.join(parts[start:])!r}")
    return names


def job_figures(report: dict[str, Any]) -> dict[str, Any]:
    """Per node job: network bytes besides data, and its parts, from the run's byte record."""
    moved = JobBytes.from_json(report["bytes"])
    jobs = sum(r["jobs_counted"] for r in report["rounds"])
    host, mirrors = moved.through_submit_host, moved.from_mirrors
    return {
        "bytes_per_job": report["bytes_per_job"],
        "model_in": (host.model_in + mirrors.model_in) / jobs,
        "model_delta_in": mirrors.model_delta_in / jobs,
        "payload_in": (host.payload_in + mirrors.payload_in) / jobs,
        "payload_from_mirrors": mirrors.payload_in / jobs,
        "update_out": host.update_out / jobs,
        "metrics_out": host.metrics_out / jobs,
        "residual_over_network": (host.residual_in + host.residual_out) / jobs,
        "submit_host_bytes_per_round": report["submit_host_bytes_per_round"],
        "model_delta_misses": report["model_delta_misses"],
        "residual_misses": report["residual_misses"],
        "jobs": jobs,
    }


def delta_figures(run_dir: Path, rounds: int) -> dict[str, float]:
    """From version to version of the run's models: the share of values that changed and the
    delta's size against the model's (written whether or not it was published)."""
    changed = total = delta_bytes = model_bytes = 0
    with tempfile.TemporaryDirectory() as tmp:
        delta = Path(tmp) / "delta.safetensors"
        for version in range(1, rounds + 1):
            base, model = model_path(run_dir, version - 1), model_path(run_dir, version)
            identity = DeltaIdentity("bench", version - 1, version, "", "")
            delta_bytes += write_delta(base, model, delta, identity)
            model_bytes += model.stat().st_size
            positions = load_tensors(delta)[0]
            changed += sum(len(t) for name, t in positions.items() if name.endswith("::idx"))
            total += sum(t.numel() for t in load_tensors(model)[0].values())
    return {"delta_density": changed / total, "delta_to_model": delta_bytes / model_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("bench-dgc"))
    parser.add_argument("rounds", nargs="?", type=int, default=6)
    parser.add_argument("local_steps", nargs="?", type=int, default=45)
    parser.add_argument("slots", nargs="?", type=int, default=2)
    parser.add_argument("--seeds", default="", help="comma-separated [run] seeds (default: one)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    args = parser.parse_args()
    out, rounds, local_steps = args.out.resolve(), args.rounds, args.local_steps
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else [None]
    cache = str(out / "machine-cache")
    results: dict[str, Any] = {}
    for name in variant_names(args.variants):
        tag = name.replace(",", "").replace(" ", "-").replace("%", "").replace(".", "")
        accuracies = []
        for seed in seeds:
            overrides = {
                "run": {"rounds": rounds, "quorum": 1.0} | ({} if seed is None else {"seed": seed}),
                "train": {"local_steps": local_steps},
                "data": {"node_cache": cache},
            }
            for table, keys in VARIANTS[name].items():
                overrides[table] = overrides.get(table, {}) | keys
            # a seed also draws the held-out images, so each seed has its own prepared dataset
            where = out if seed is None else out / f"seed{seed}"
            run_name = f"{tag}-{rounds}x{local_steps}"
            report = run_demo_variant(where, run_name, overrides, args.slots)
            accuracies.append(report["final_accuracy"])
            if name not in results:
                results[name] = {
                    **job_figures(report),
                    **delta_figures(where / run_name, rounds),
                }
        results[name]["final_accuracy"] = fmean(accuracies)
        results[name]["seed_accuracies"] = accuracies
    dense = results.get("dense")  # without it (candidates only): no ratios
    print(f"demo task, 4 nodes x {rounds} rounds x {local_steps} local steps; per node job:")
    for name, r in results.items():
        against = ""
        if dense:
            r["job_bytes_ratio"] = r["bytes_per_job"] / dense["bytes_per_job"]
            r["update_bytes_ratio"] = r["update_out"] / dense["update_out"]
            r["accuracy_points"] = 100 * (r["final_accuracy"] - dense["final_accuracy"])
            against = (
                f" ({r['job_bytes_ratio']:.3f}x dense, update {r['update_bytes_ratio']:.4f}x, "
                f"accuracy {r['accuracy_points']:+.1f} points)"
            )
        print(
            f"{name:30s} {r['bytes_per_job'] / 1e3:7.1f} KB{against}: "
            f"model {r['model_in'] / 1e3:.1f} KB whole + {r['model_delta_in'] / 1e3:.1f} KB "
            f"delta, payload and config {r['payload_in'] / 1e3:.1f} KB (from the mirrors "
            f"{r['payload_from_mirrors'] / 1e3:.1f}), update {r['update_out'] / 1e3:.1f} KB, "
            f"metrics {r['metrics_out'] / 1e3:.1f} KB; "
            f"delta density {r['delta_density']:.4f}, delta {r['delta_to_model']:.3f}x the "
            f"model; submit host {r['submit_host_bytes_per_round'] / 1e3:.0f} KB/round; "
            f"{r['model_delta_misses']} delta misses, {r['residual_misses']} residual misses; "
            f"accuracy {r['final_accuracy']:.3f} (seeds "
            f"{', '.join(f'{a:.3f}' for a in r['seed_accuracies'])})"
        )
    (out / f"results-{rounds}x{local_steps}.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
