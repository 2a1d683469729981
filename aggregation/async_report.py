"""The report of an asynchronous run: held-out accuracy (fragments and images), recall and
confusion against versions and wall time (also as TensorBoard scalars), what became of every job,
staleness, each lane's busy time against the run's wall time, and the bytes the jobs moved."""

from collections import Counter
from pathlib import Path
from typing import Any

from aggregation.async_state import Ledger, lane_step, read_ledger
from aggregation.evictions import lane_evictions, with_evictions
from aggregation.heldout import load_heldout, run_manifest
from aggregation.heldout_metrics import final_metrics, heldout_metrics
from aggregation.node_metrics import figure, read_node_metrics
from aggregation.tensorboard_log import log_evaluations
from aggregation.utilization import node_usage
from node_payload.common.job_bytes import JobBytes
from node_payload.common.model_file import load_model
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import METRICS_FILE, UPDATE_FILE, lane_job_dir, model_path


def evaluated_versions(last: int, most: int) -> list[int]:
    """At most `most` versions spread evenly from 0 to last, always both ends."""
    if last + 1 <= most:
        return list(range(last + 1))
    return sorted({round(i * last / (most - 1)) for i in range(most)})


def job_metrics(run_dir: Path, ledger: Ledger) -> dict[str, dict[str, Any]]:
    """metrics.json of every job that finished, by job key."""
    found = {}
    for key in ledger.done:
        lane, step = lane_step(key)
        path = lane_job_dir(run_dir, lane, step) / METRICS_FILE
        metrics = read_node_metrics(path, f"lane {lane} job {step}") if path.is_file() else None
        if metrics is not None:
            found[key] = metrics
    return found


def _evaluations(run_dir: Path, config: RunConfig, ledger: Ledger) -> list[dict[str, Any]]:
    heldout = load_heldout(run_dir, config, run_manifest(config, 0), 0)
    made_at = {v["version"]: v["at"] for v in ledger.versions}
    start = ledger.started_at or 0.0
    rows = []
    for version in evaluated_versions(ledger.version, config.async_.evaluations):
        model, _ = load_model(model_path(run_dir, version))
        seconds = made_at.get(version, start) - start
        rows.append({"version": version, "seconds": seconds, **heldout_metrics(model, heldout)})
    return rows


def _update_bytes(run_dir: Path, ledger: Ledger) -> int:
    """Bytes of the updates applied: what the nodes sent that the model took in."""
    total = 0
    for key in (key for version in ledger.versions for key in version["updates"]):
        total += (lane_job_dir(run_dir, *lane_step(key)) / UPDATE_FILE).stat().st_size
    return total


def run_bytes(run_dir: Path, jobs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the finished jobs moved, as a synchronous report sums its rounds' jobs
    (aggregation/round_bytes.py): their metrics.json `bytes` summed by kind and way, with
    metrics.json itself; the submit host's total; the mean network bytes per job besides data;
    and the compressed jobs that started without their lane's residual (a lane's first job has
    none). A node's record that is not one is named and left out; nothing without a record."""
    total, counted, misses = JobBytes(), 0, 0
    for key, metrics in sorted(jobs.items()):
        lane, step = lane_step(key)
        record = JobBytes.from_json(metrics.get("bytes")) if isinstance(metrics, dict) else None
        if record is None:
            print(f"lane {lane} job {step}: bytes left out: no byte record", flush=True)
            continue
        size = (lane_job_dir(run_dir, lane, step) / METRICS_FILE).stat().st_size
        total += record.with_metrics(size)
        counted += 1
        misses += step > 0 and metrics.get("residual") not in (None, "loaded")
    if not counted:
        return {}
    return {
        "bytes": total.to_json(),
        "submit_host_bytes": total.through_submit_host.total,
        "bytes_per_job": round(total.network_without_data / counted),
        "jobs_counted": counted,
        "residual_misses": misses,
    }


def _outcomes(ledger: Ledger) -> dict[str, dict[str, str]]:
    """Jobs that gave nothing, by kind: rejected updates, failed and removed jobs."""
    kinds: dict[str, dict[str, str]] = {"rejected": {}, "failed": {}}
    for key, what in sorted(ledger.done.items()):
        if what.startswith("rejected"):
            kinds["rejected"][key] = what.removeprefix("rejected: ")
        elif not what.startswith("accepted"):
            kinds["failed"][key] = what
    return kinds


def async_report(run_dir: Path, config: RunConfig, dag_status: int) -> dict[str, Any]:
    ledger = read_ledger(run_dir)
    evaluations = _evaluations(run_dir, config, ledger)
    log_evaluations(run_dir, evaluations, ledger.started_at or 0.0)
    jobs = job_metrics(run_dir, ledger)
    lanes = config.run.nodes
    busy = dict.fromkeys(range(lanes), 0.0)
    for key, metrics in jobs.items():
        busy[lane_step(key)[0]] += figure(metrics, "seconds")
    ends = [v["at"] for v in ledger.versions]
    wall = max(ends) - ledger.started_at if ends and ledger.started_at else None
    staleness = [s for v in ledger.versions for s in v["staleness"]]
    outcomes = _outcomes(ledger)
    evictions = lane_evictions(run_dir, lanes)  # and the work they lost and saved, per lane
    per_lane = evictions.pop("evictions_per_node")
    return {
        "run": config.run.name,
        "mode": "async",
        "status": "completed" if dag_status == 0 else "failed",
        "dag_status": dag_status,
        "summary": (
            f"{ledger.accepted}/{config.update_budget} updates in {ledger.version} versions"
        ),
        "nodes": lanes,
        "update_budget": config.update_budget,
        "updates_accepted": ledger.accepted,
        "versions": ledger.version,
        **final_metrics(evaluations[-1] if ledger.version else None),
        "seconds": wall,
        "bytes_downloaded": sum(figure(m, "bytes_downloaded") for m in jobs.values()),
        "mirror_failovers": sum(figure(m, "mirror_failovers") for m in jobs.values()),
        "update_bytes": _update_bytes(run_dir, ledger),
        **run_bytes(run_dir, jobs),
        "updates_rejected": len(outcomes["rejected"]),
        "rejected": outcomes["rejected"],
        "jobs_failed": outcomes["failed"],
        "updates_clipped": sum(len(v["clipped"]) for v in ledger.versions),
        "staleness": {
            "mean": sum(staleness) / len(staleness) if staleness else None,
            "max": max(staleness, default=None),
            "histogram": {str(k): n for k, n in sorted(Counter(staleness).items())},
        },
        "jobs_per_lane": {
            str(lane): sum(1 for key in jobs if lane_step(key)[0] == lane) for lane in range(lanes)
        },
        **evictions,
        **with_evictions(node_usage(busy, wall), per_lane),
        "evaluations": evaluations,
        "version_log": ledger.versions,
    }
