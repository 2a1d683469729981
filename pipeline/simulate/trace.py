"""What happened in a simulated run, for summary.py."""

from dataclasses import dataclass, field


@dataclass
class Trace:
    """Times, counts and bytes of one simulated run."""

    end: float = 0.0
    dag_ok: bool = True
    rounds: dict[int, tuple[float, float]] = field(default_factory=dict)  # round: (start, end)
    missing: dict[int, int] = field(default_factory=dict)  # round: nodes missing
    busy: dict[int, float] = field(default_factory=dict)  # node index: payload seconds
    first_claim: float = 0.0  # async: the ledger's start
    versions: list[float] = field(default_factory=list)  # async: when each version was applied
    staleness: list[int] = field(default_factory=list)
    jobs_begun: int = 0  # each sent its inputs (an evicted job sends them again)
    jobs_returned: int = 0  # each sent its update back
    evictions: int = 0
    lost_s: float = 0.0  # machine seconds of evicted or removed runs, lost
    saved_s: float = 0.0  # and the training seconds of evicted runs their checkpoints kept
    machine_busy_s: float = 0.0
    machine_available_s: float = 0.0
    jobs_skipped: int = 0
    failed: list[str] = field(default_factory=list)
