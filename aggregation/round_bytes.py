"""What a round's node jobs moved, from their metrics.json (node_payload/common/job_bytes.py):
the sum by kind and way, the submit host's total (HTCondor file transfer, both directions), the
mean bytes a job moved over the network besides its training data (the figure compression
changes), how many compressed jobs started without their lane's residual, and how many jobs got
their model by delta and how many fetched it whole although the pointer named a delta.

metrics.json comes from the node: a record that is not one is named in the job's output and
left out, never a reason to fail the round.
"""

from pathlib import Path
from typing import Any

from aggregation.node_metrics import read_node_metrics
from node_payload.common.job_bytes import JobBytes
from node_payload.common.run_layout import METRICS_FILE, node_dir


def round_bytes(run_dir: Path, round_: int, nodes: int) -> dict[str, Any]:
    """The round.json entries of every node job of the round that returned its metrics."""
    total, jobs, misses, by_delta, delta_misses = JobBytes(), 0, 0, 0, 0
    for node in range(nodes):
        path = node_dir(run_dir, round_, node) / METRICS_FILE
        if not path.is_file():
            continue
        size = path.stat().st_size
        metrics = read_node_metrics(path, f"round {round_} node {node}")
        record = JobBytes.from_json(metrics.get("bytes")) if metrics is not None else None
        if record is None:
            print(f"round {round_} node {node}: bytes left out: no byte record", flush=True)
            continue
        total += record.with_metrics(size)
        jobs += 1
        misses += round_ > 0 and metrics.get("residual") not in (None, "loaded")
        how = metrics.get("model")
        by_delta += how == "delta"
        delta_misses += isinstance(how, str) and how.startswith("whole:")
    return {
        "bytes": total.to_json(),
        "submit_host_bytes": total.through_submit_host.total,
        "bytes_per_job": round(total.network_without_data / jobs) if jobs else None,
        "jobs_counted": jobs,
        "residual_misses": misses,
        "models_by_delta": by_delta,
        "model_delta_misses": delta_misses,
    }
