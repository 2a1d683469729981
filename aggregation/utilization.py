"""Node busy time against the run's wall time, in either mode."""

from typing import Any


def node_usage(busy: dict[int, float], wall: float | None) -> dict[str, Any]:
    """Busy time and utilization per node: how much of the run each node spent working, which
    shows what a synchronous run loses waiting for its slowest node."""
    usage = {
        str(n): {"busy_seconds": s, "utilization": s / wall if wall else None}
        for n, s in sorted(busy.items())
    }
    shares = [u["utilization"] for u in usage.values()]
    mean = sum(shares) / len(shares) if shares and None not in shares else None
    return {"wall_seconds": wall, "mean_utilization": mean, "node_usage": usage}
