"""Aggregation throughput (MB of updates merged per second) and peak memory against model size.

Each measurement runs in a fresh process so its peak RSS is its own. Run:
    python benchmarks/bench_aggregation.py
"""

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from aggregation.job_plan import JobPlan
from aggregation.merge import merge_updates
from node_payload.common.tensor_io import load_tensors, save_tensors, update_metadata

NODES = 8


def _state(params_millions: float) -> dict[str, torch.Tensor]:
    """A model-like state: a few large layers plus BatchNorm-like buffers."""
    layers = 8
    per_layer = int(params_millions * 1e6 / layers)
    state = {f"layer{i}.weight": torch.randn(per_layer) for i in range(layers)}
    state["bn.running_mean"] = torch.zeros(64)
    state["bn.num_batches_tracked"] = torch.tensor(0)
    return state


def write_updates(params_millions: float, directory: Path) -> None:
    torch.manual_seed(0)
    global_state = _state(params_millions)
    save_tensors(directory / "global.safetensors", global_state, {})
    for node in range(NODES):
        update = {k: (v * 0.01 if v.is_floating_point() else v) for k, v in global_state.items()}
        save_tensors(
            directory / f"n{node}.safetensors", update, update_metadata(0, node, 100 + node, 0)
        )


def measure(directory: Path) -> dict[str, float]:
    """Runs in a fresh process: baseline RSS = interpreter + torch + the global model."""
    global_state, _ = load_tensors(directory / "global.safetensors")
    paths = [(n, directory / f"n{n}.safetensors") for n in range(NODES)]
    update_bytes = sum(p.stat().st_size for _, p in paths)
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    plan = JobPlan(samples=100 + NODES, steps=1)
    result = merge_updates(global_state, iter(paths), bound=1e12, round_=0, plan=plan)
    seconds = time.perf_counter() - started
    assert len(result.accepted) == NODES
    model_mb = sum(v.numel() * v.element_size() for v in global_state.values()) / 1e6
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "model_mb": round(model_mb, 1),
        "updates_mb": round(update_bytes / 1e6, 1),
        "seconds": round(seconds, 3),
        "throughput_mb_s": round(update_bytes / 1e6 / seconds, 1),
        "merge_memory_mb": round(peak_mb - baseline_mb, 1),
        "merge_memory_over_model": round((peak_mb - baseline_mb) / model_mb, 2),
    }


def main() -> None:
    if len(sys.argv) == 2:
        print(json.dumps(measure(Path(sys.argv[1]))))
        return
    print(f"{NODES} updates per round, merged in one process each")
    print(f"{'model MB':>9} {'updates MB':>11} {'s':>7} {'MB/s':>8} {'merge MB':>9} {'/model':>7}")
    for millions in (2.5, 10, 40):
        with tempfile.TemporaryDirectory() as tmp:
            write_updates(millions, Path(tmp))
            out = subprocess.run(
                [sys.executable, __file__, tmp], capture_output=True, text=True, check=True
            )
        r = json.loads(out.stdout)
        print(
            f"{r['model_mb']:>9} {r['updates_mb']:>11} {r['seconds']:>7} "
            f"{r['throughput_mb_s']:>8} {r['merge_memory_mb']:>9} {r['merge_memory_over_model']:>7}"
        )


if __name__ == "__main__":
    main()
