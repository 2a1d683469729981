"""The bytes one node job moved, by kind and by the way they went.

Three ways: through the submit host (HTCondor file transfer: the entries of submit/node.sub's
transfer_input_files and transfer_output_files, which all pass through the schedd's machine),
from the mirrors (FTP), and on the execute machine (its own cache: a compressed update's
residual, which never crosses the network). Each is a `Moved`, one field per kind. A node job
records what it read and wrote in metrics.json ("bytes"); the round's aggregation adds the one
file the job cannot measure while writing it (metrics.json) and sums the round's jobs.

In metrics.json, round.json and report.json:
  "bytes": {"through_submit_host": {KIND: n, ...}, "from_mirrors": {...}, "on_machine": {...}}

The job payload: run as itself, it came through the submit host; run by its launcher
(pipeline/payload_launcher.py), only the launcher did, and the payload came from the machine's
cache or the mirrors, which the launcher tells it in LAUNCHED_VARIABLE.
"""

import os
import zipimport
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

_MOST = 2**63  # a count beyond this is no file size
# Set by the payload's launcher: "LAUNCHER_BYTES FROM_MIRRORS FROM_CACHE" (the payload's bytes)
LAUNCHED_VARIABLE = "DAGTRAIN_LAUNCHED"


@dataclass(frozen=True)
class Moved:
    """Bytes by kind: payload_in is the job payload (dagtrain.pyz, or its launcher) and
    config.toml; model_delta_in a published model's delta from the version before."""

    model_in: int = 0
    model_delta_in: int = 0
    payload_in: int = 0
    data_in: int = 0
    residual_in: int = 0
    residual_out: int = 0
    update_out: int = 0
    metrics_out: int = 0

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    @property
    def without_data(self) -> int:
        """What the job moved besides its training data: what compression can change."""
        return self.total - self.data_in

    def __add__(self, other: "Moved") -> "Moved":
        return Moved(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )


@dataclass(frozen=True)
class JobBytes:
    """One job's bytes (or a round's or a run's sum) by the way they went."""

    through_submit_host: Moved = Moved()
    from_mirrors: Moved = Moved()
    on_machine: Moved = Moved()

    @property
    def network_without_data(self) -> int:
        """What crossed the network besides the training data."""
        return self.through_submit_host.without_data + self.from_mirrors.without_data

    def __add__(self, other: "JobBytes") -> "JobBytes":
        return JobBytes(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def with_metrics(self, size: int) -> "JobBytes":
        """With the job's metrics.json, returned through the submit host."""
        return replace(
            self, through_submit_host=replace(self.through_submit_host, metrics_out=size)
        )

    def to_json(self) -> dict[str, dict[str, int]]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> "JobBytes | None":
        """A job's record as metrics.json holds it, or None when it is not one: a node's file is
        untrusted, and a record of other keys, or of counts that are not sizes, is no record."""
        if not isinstance(raw, dict) or raw.keys() != {f.name for f in fields(cls)}:
            return None
        kinds = {f.name for f in fields(Moved)}
        ways = []
        for way in raw.values():
            if not isinstance(way, dict) or way.keys() != kinds:
                return None
            if not all(type(n) is int and 0 <= n < _MOST for n in way.values()):
                return None
            ways.append(Moved(**way))
        return cls(*ways)


def payload_bytes(config_path: Path) -> JobBytes:
    """The job payload the job runs from (nothing from a source tree, as in tests), and its
    config, by the way they came."""
    config = config_path.stat().st_size
    launched = os.environ.get(LAUNCHED_VARIABLE, "").split()
    if len(launched) == 3 and all(n.isdigit() for n in launched):
        launcher, fetched, cached = map(int, launched)
        return JobBytes(
            through_submit_host=Moved(payload_in=launcher + config),
            from_mirrors=Moved(payload_in=fetched),
            on_machine=Moved(payload_in=cached),
        )
    loader = globals().get("__loader__")
    archive = (
        Path(loader.archive).stat().st_size if isinstance(loader, zipimport.zipimporter) else 0
    )
    return JobBytes(through_submit_host=Moved(payload_in=archive + config))
