"""Job user-log events in HTCondor's text format, so htcondor2.JobEventLog and any tool that
reads a pool's job.log read the local one too."""

from __future__ import annotations

import threading
import time
from pathlib import Path

_LOCK = threading.Lock()  # several nodes may share one log file
_HOST = "<127.0.0.1:0?alias=local-runner>"
_RUN_USAGE = (
    "\t\tUsr 0 00:00:00, Sys 0 00:00:00  -  Run Remote Usage\n"
    "\t\tUsr 0 00:00:00, Sys 0 00:00:00  -  Run Local Usage\n"
    "\t0  -  Run Bytes Sent By Job\n"
    "\t0  -  Run Bytes Received By Job\n"
)
_USAGE = (
    "\t\tUsr 0 00:00:00, Sys 0 00:00:00  -  Run Remote Usage\n"
    "\t\tUsr 0 00:00:00, Sys 0 00:00:00  -  Run Local Usage\n"
    "\t\tUsr 0 00:00:00, Sys 0 00:00:00  -  Total Remote Usage\n"
    "\t\tUsr 0 00:00:00, Sys 0 00:00:00  -  Total Local Usage\n"
    "\t0  -  Run Bytes Sent By Job\n"
    "\t0  -  Run Bytes Received By Job\n"
    "\t0  -  Total Bytes Sent By Job\n"
    "\t0  -  Total Bytes Received By Job\n"
)


class UserLog:
    """Appends the events of one job (one cluster) to its `log` file, if it has one."""

    def __init__(self, path: Path | None, cluster: int, node: str) -> None:
        self.path = path
        self.cluster = cluster
        self.node = node

    def _write(self, code: int, headline: str, body: str = "") -> None:
        if self.path is None:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        event = f"{code:03d} ({self.cluster:03d}.000.000) {stamp} {headline}\n{body}...\n"
        with _LOCK:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(event)

    def submitted(self) -> None:
        self._write(0, f"Job submitted from host: {_HOST}", f"    DAG Node: {self.node}\n")

    def executing(self, slot: int | None = None) -> None:
        """On the slot's own host name, so a job restarted elsewhere names another machine."""
        host = (
            _HOST if slot is None else _HOST.replace("=local-runner", f"=slot{slot}.local-runner")
        )
        self._write(1, f"Job executing on host: {host}")

    def checkpoint_transferred(self) -> None:
        """As HTCondor 23 logs a self-checkpointing job's checkpoint going to the spool."""
        self._write(40, "Started transferring output files")
        self._write(40, "Finished transferring output files")

    def evicted(self) -> None:
        """As a pool logs a vacated job (condor_vacate_job, an owner back at the machine):
        it goes back to the queue, to start again wherever it is matched next."""
        self._write(4, "Job was evicted.", "\t(0) Job was not checkpointed.\n" + _RUN_USAGE)

    def terminated(self, exit_code: int | None, signal: int | None) -> None:
        if signal is not None:
            status = f"\t(0) Abnormal termination (signal {signal})\n\t(0) No core file\n"
        else:
            status = f"\t(1) Normal termination (return value {exit_code})\n"
        self._write(5, "Job terminated.", status + _USAGE)

    def held(self, reason: str, code: int, subcode: int) -> None:
        self._write(12, "Job was held.", f"\t{reason}\n\tCode {code} Subcode {subcode}\n")

    def aborted(self, reason: str) -> None:
        self._write(9, "Job was aborted.", f"\t{reason}\n")
