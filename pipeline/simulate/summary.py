"""A simulated run's figures, named as the run's own report names them (report.json's
`wall_seconds` and `mean_utilization`, by aggregation/utilization.py), so a prediction and a
measurement compare key by key."""

from collections import Counter
from statistics import fmean
from typing import Any

from aggregation.utilization import node_usage
from node_payload.common.job_bytes import JobBytes, Moved

from .trace import Trace
from .workload import Workload


def _report_wall(trace: Trace, work: Workload) -> float | None:
    """As the report measures it: from the first node's start to the last aggregation's end
    (sync), or from the first claim to the last version (async)."""
    if work.config.is_async:
        return trace.versions[-1] - trace.first_claim if trace.versions else None
    if not trace.rounds:
        return None
    return max(end for _, end in trace.rounds.values()) - min(s for s, _ in trace.rounds.values())


def _round_seconds(trace: Trace) -> list[float]:
    """Each round's time: from the end of the round before (or the DAG's start) to its end."""
    ends = [trace.rounds[r][1] for r in sorted(trace.rounds)]
    return [end - before for before, end in zip([0.0, *ends], ends, strict=False)]


def moved(trace: Trace, work: Workload) -> JobBytes:
    """The run's bytes: every job that began sent its inputs (again after an eviction), every
    job that finished sent its update and metrics back."""
    one = work.job_bytes
    submit, mirrors = one.through_submit_host, one.from_mirrors
    began, returned = trace.jobs_begun, trace.jobs_returned
    return JobBytes(
        through_submit_host=Moved(
            model_in=submit.model_in * began,
            payload_in=submit.payload_in * began,
            update_out=submit.update_out * returned,
            metrics_out=submit.metrics_out * returned,
        ),
        from_mirrors=Moved(model_in=mirrors.model_in * began, data_in=mirrors.data_in * began),
    )


def summarise(label: str, trace: Trace, work: Workload, machines: int) -> dict[str, Any]:
    config = work.config
    wall = _report_wall(trace, work)
    busy = dict.fromkeys(range(config.run.nodes), 0.0) | trace.busy
    usage = node_usage(busy, wall)
    staleness = trace.staleness
    rounds = _round_seconds(trace)
    total = moved(trace, work)
    return {
        "variant": label,
        "mode": config.run.mode,
        "quorum": config.run.quorum,
        "nodes": config.run.nodes,
        "rounds": config.run.rounds,
        "local_steps": work.steps,
        "node_deadline_s": config.run.node_deadline_s,
        "machines": machines,
        "dag_ok": trace.dag_ok,
        "failed_nodes": trace.failed[:10],
        "seconds_to_finish": trace.end,
        "wall_seconds": wall,
        "mean_utilization": usage["mean_utilization"],
        "machine_utilization": (
            trace.machine_busy_s / trace.machine_available_s if trace.machine_available_s else None
        ),
        "round_seconds": rounds,
        "mean_round_seconds": fmean(rounds) if rounds else None,
        "nodes_missing": [trace.missing[r] for r in sorted(trace.missing)],
        "versions": len(trace.versions),
        "staleness": {
            "mean": fmean(staleness) if staleness else None,
            "max": max(staleness, default=None),
            "histogram": {str(k): n for k, n in sorted(Counter(staleness).items())},
        },
        "bytes": total.to_json(),
        "bytes_through_submit_host": total.through_submit_host.total,
        "bytes_from_mirrors": total.from_mirrors.total,
        "jobs_run": trace.jobs_begun,
        "jobs_skipped": trace.jobs_skipped,
        "evictions": trace.evictions,
        "lost_machine_seconds": trace.lost_s,
        "saved_machine_seconds": trace.saved_s,
        "node_usage": usage["node_usage"] if config.run.nodes <= 64 else None,
    }
