"""Update compression against dense updates on the demo task (synchronous, 4 nodes), side by
side in one run: the bytes a node job moves and the accuracy the run reaches.

Variants of the same work: dense float32 updates; DGC at 99% sparsity without warm-up, with the
machine cache (`[data] node_cache`: the lanes' residuals, the last global model, the job
payload) kept (the local runner's slots share one machine, so every job finds them), and again
with the machine cache lost (`node_cache` relative: each job's own scratch folder, as if every
job landed on a machine none of its run's jobs ran on); fp16 and int8 quantised updates with
error feedback; DGC 99% with server momentum 0.9, to show what momentum does to the model's
delta; and DGC 99% with momentum correction at the nodes (`[compression] momentum = 0.9`),
with a one-round warm-up (`warmup = 1`) and with a server lr of 1.5 or 2 (a larger step for the
few values a round applies), settings that might close its accuracy gap. ROUNDS and
LOCAL_STEPS change the demo's 6 x 45 (error feedback needs rounds: see docs/benchmarks.md).
`--variants` picks some (names joined by commas).

Per variant, from report.json (node_payload/common/job_bytes.py): the network bytes per node job
besides its training data (model or its delta in, payload's launcher and config in, update and
metrics out) and its parts, the submit host's bytes per round, the jobs that fetched their
model whole although a delta was published and those that started without their residual, the
final held-out accuracy; and from the run's models, how many of the model's values changed from
one version to the next (the delta's density) and the delta's size. With --seeds, every variant
runs once per `[run] seed` (its held-out split, data draws and initial model), in OUT/seedN, and
its accuracy is their mean, with each seed's beside it; the bytes are the first seed's. With
--flush, each DGC run with its machine cache kept also says what a last round sending more of
each lane's residual would have given (flush_figures). Without dense among the variants, no
ratios. Writes results-ROUNDSxLOCAL_STEPS.json to OUT.

Run:  python benchmarks/bench_dgc.py [OUT] [ROUNDS] [LOCAL_STEPS] [SLOTS] [--seeds 1,2]
          [--variants "dense,dgc 99%"] [--flush]
"""

import argparse
import json
import tempfile
from pathlib import Path
from statistics import fmean
from typing import Any

import torch

from node_payload import dgc
from node_payload.common import sparse_update
from node_payload.common.job_bytes import JobBytes
from node_payload.common.model_delta import DeltaIdentity, write_delta
from node_payload.common.model_file import load_model
from node_payload.common.run_config import read_run_config
from node_payload.common.run_layout import CONFIG_FILE, HELDOUT_CACHE, model_path
from node_payload.common.tensor_io import load_tensors
from node_payload.machine_cache import run_key
from node_payload.residual_cache import Residual
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
    "dgc 99%, server lr 1.5": {"compression": DGC_99, "server": {"lr": 1.5}},
    "dgc 99%, server lr 2": {"compression": DGC_99, "server": {"lr": 2.0}},
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


FLUSHED = (0.01, 0.02, 0.05, 1.0)  # shares of each lane's final residual a last job would add


def flush_figures(run_dir: Path, machine_cache: Path, rounds: int, jobs: int) -> dict[str, Any]:
    """What sending more of the lanes' residuals in the last round would give: for each share,
    the held-out fragment accuracy of the final model moved by the mean of each lane's top values
    of its final residual (what the last jobs would have added at that lower sparsity; the lanes
    have equal sample counts), and those files' bytes spread over the run's jobs. Share 0 is
    the run's own model, as a check on this evaluation. Also how large the residuals are: the
    L2 norm of a lane's v (root mean square over the lanes) against that of the run's whole
    change of the same weights."""
    run_id = read_run_config(run_dir / CONFIG_FILE).run.run_id
    folder = machine_cache / "residuals" / run_key(run_id)
    lanes = sorted(folder.glob(f"l*_j{rounds - 1:04d}.safetensors"))
    if not lanes:
        raise SystemExit(f"{folder}: no residuals of the run's last round (machine cache cleared?)")
    model, _ = load_model(model_path(run_dir, rounds))
    final = {name: t.clone() for name, t in model.state_dict().items()}
    heldout = load_tensors(run_dir / HELDOUT_CACHE)[0]
    first = load_tensors(model_path(run_dir, 0))[0]
    residuals = [load_tensors(lane)[0] for lane in lanes]
    change = sum(float((final[n] - first[n]).norm()) ** 2 for n in _error_fed(residuals[0]))
    held_back = fmean(sum(float(t.norm()) ** 2 for t in _error_fed(r).values()) for r in residuals)
    figures: dict[str, Any] = {"residual_to_change": (held_back / change) ** 0.5}
    for share in (0.0, *FLUSHED):
        moved, extra = {name: torch.zeros_like(t) for name, t in final.items()}, 0
        for tensors in residuals if share else []:
            v = _error_fed(tensors)
            zero = {name: torch.zeros_like(t) for name, t in v.items()}
            flush = dgc.compress(zero, set(v), Residual(v=v), dgc.DgcSettings(1 - share, 0), 0)
            for name, part in flush.sparse.items():
                moved[name].view(-1)[part.positions] += part.values.float() / len(lanes)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "flush.safetensors"
                sparse_update.save_sparse_update(path, {}, flush.sparse, {})
                extra += path.stat().st_size
        model.load_state_dict({name: t - moved[name] for name, t in final.items()})
        model.eval()
        with torch.no_grad():
            right = (model(heldout["x"]).argmax(1) == heldout["y"]).float().mean().item()
        figures[str(share)] = {"accuracy": right, "extra_bytes_per_job": extra / jobs}
    return figures


def _error_fed(residual: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A residual file's v tensors by parameter name."""
    return {key[: -len("::v")]: t for key, t in residual.items() if key.endswith("::v")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("bench-dgc"))
    parser.add_argument("rounds", nargs="?", type=int, default=6)
    parser.add_argument("local_steps", nargs="?", type=int, default=45)
    parser.add_argument("slots", nargs="?", type=int, default=2)
    parser.add_argument("--seeds", default="", help="comma-separated [run] seeds (default: one)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    parser.add_argument(
        "--flush", action="store_true", help="DGC runs: what a last round sending more would give"
    )
    args = parser.parse_args()
    out, rounds, local_steps = args.out.resolve(), args.rounds, args.local_steps
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.seeds else [None]
    cache = str(out / "machine-cache")
    results: dict[str, Any] = {}
    for name in variant_names(args.variants):
        tag = name.replace(",", "").replace(" ", "-").replace("%", "").replace(".", "")
        accuracies, flushes = [], []
        keeps_residuals = VARIANTS[name]["compression"]["method"] == "dgc"
        keeps_residuals &= "data" not in VARIANTS[name]  # the machine cache is kept
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
            if keeps_residuals and args.flush:
                jobs = sum(r["jobs_counted"] for r in report["rounds"])
                flushes.append(flush_figures(where / run_name, Path(cache), rounds, jobs))
            if name not in results:
                results[name] = {
                    **job_figures(report),
                    **delta_figures(where / run_name, rounds),
                }
        results[name]["final_accuracy"] = fmean(accuracies)
        results[name]["seed_accuracies"] = accuracies
        if flushes:
            results[name]["residual_to_change"] = [f.pop("residual_to_change") for f in flushes]
            results[name]["last_round_flush"] = {
                share: {
                    "accuracy": fmean(f[share]["accuracy"] for f in flushes),
                    "seed_accuracies": [f[share]["accuracy"] for f in flushes],
                    "extra_bytes_per_job": flushes[0][share]["extra_bytes_per_job"],
                }
                for share in flushes[0]
            }
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
        if "residual_to_change" in r:
            print(
                f"{'':30s} a lane's final residual against the run's change of the weights "
                f"(L2): {', '.join(f'{x:.2f}' for x in r['residual_to_change'])} by seed"
            )
        for share, f in r.get("last_round_flush", {}).items():
            print(
                f"{'':30s} last round adding {float(share):.0%} of the residuals: accuracy "
                f"{f['accuracy']:.3f} (seeds {', '.join(f'{a:.3f}' for a in f['seed_accuracies'])})"
                f", +{f['extra_bytes_per_job'] / 1e3:.1f} KB a job"
            )
    (out / f"results-{rounds}x{local_steps}.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
