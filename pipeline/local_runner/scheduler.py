"""The DAG engine: starts ready nodes, records outcomes, runs FINAL, writes status and rescue.

All DAG state lives in the thread that called `run_dag`; node threads report through a queue,
which is also where `on_event` callbacks are made, so callers never see concurrent calls.
"""

from __future__ import annotations

import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from node_payload.common.errors import UserError
from pipeline.dag.model import Dag

from . import status_file
from .dag_file import parse_dag
from .journal import Journal, journal_path, read_journal, read_rescue, rescue_files, write_rescue
from .node_runner import NodeContext, NodeRunner, Outcome
from .serial_order import serial_ranks
from .slots import Evictions, SlotPool
from .status_file import DONE, ERROR, FUTILE, NOT_READY, READY, NodeState
from .warm_pool import WarmPool

# $DAG_STATUS values (DAGMan manual, "Scripts": special script argument macros).
DAG_OK, DAG_NODES_FAILED, DAG_ABORTED = 0, 2, 3


@dataclass(frozen=True)
class NodeEvent:
    """kind: submitted | running | evicted | done | failed | retry | removed."""

    node: str
    kind: str
    attempt: int
    exit_code: int | None
    time: float


@dataclass
class DagResult:
    ok: bool
    exit_code: int  # what condor_dagman would exit with: 0, 1, or an ABORT-DAG-ON RETURN value
    dag_status: int  # $DAG_STATUS before the FINAL node ran
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    futile: list[str] = field(default_factory=list)
    rescue_file: Path | None = None


class DagInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run; finished nodes are journaled, a rerun resumes."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Scheduler:
    def __init__(
        self,
        dag: Dag,
        slots: int,
        on_event: Callable[[NodeEvent], None] | None,
        slot_environment: dict[int, dict[str, str]],
        serial: bool,
        warm_pythons: frozenset[str],
        evictions: Evictions | None,
    ) -> None:
        if slots < 1:
            raise UserError(f"slots must be at least 1, got {slots}")
        self.dag = dag
        self.on_event = on_event
        self.slot_environment = slot_environment
        self.work = dag.directory / ".local_runner"
        self.cancel = threading.Event()
        self.inbox: queue.Queue[tuple] = queue.Queue()
        cap = min(slots, dag.max_jobs_submitted or slots)
        self.pool = SlotPool(cap, dag.maxjobs, self.cancel)
        self.states: dict[str, NodeState] = {}
        self.done: set[str] = set()
        self.failed: dict[str, int] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.aborted: tuple[str, int] | None = None
        self.interrupted: int | None = None
        self.error: BaseException | None = None
        self.cluster_lock = threading.Lock()
        self.last_status_write = 0.0
        self.ranks = serial_ranks(dag) if serial else None
        self.warm = WarmPool(warm_pythons, self.work) if warm_pythons else None
        self.evictions = evictions

    # ----- state shared with node threads (read-only or locked) -----
    def next_cluster(self) -> int:
        """Cluster ids keep increasing across runs, so a shared job log stays unambiguous."""
        counter = self.work / "next_cluster"
        with self.cluster_lock:
            value = int(counter.read_text()) if counter.exists() else 1
            counter.write_text(str(value + 1))
            return value

    def dag_status(self) -> tuple[int, int]:
        if self.aborted is not None:
            return DAG_ABORTED, len(self.failed)
        return (DAG_NODES_FAILED if self.failed else DAG_OK), len(self.failed)

    # ----- main thread -----
    def _set_state(self, name: str, status: int, details: str = "", retry: int = 0) -> None:
        job_queued = status == status_file.SUBMITTED
        self.states[name] = NodeState(name, status, details, retry, job_queued)

    def _emit(self, name: str, kind: str, attempt: int, code: int | None) -> None:
        if self.on_event is not None:
            self.on_event(NodeEvent(name, kind, attempt, code, time.time()))

    def _initially_done(self) -> set[str]:
        done = {n.name for n in self.dag.nodes.values() if n.done}
        rescues = rescue_files(self.dag.path)
        sources = [(rescues[-1], read_rescue(rescues[-1]))] if rescues else []
        journal = journal_path(self.dag.path)
        sources.append((journal, read_journal(journal)))
        for origin, names in sources:
            unknown = sorted(names - set(self.dag.nodes))
            if unknown:
                raise UserError(f"{origin}: marks unknown node(s) {unknown} DONE; remove the file")
            done |= names
        return done - ({self.dag.final} if self.dag.final else set())

    def _ready(self) -> list[str]:
        ready = [
            n.name
            for n in self.dag.nodes.values()
            if not n.final
            and n.name not in self.done
            and n.name not in self.failed
            and n.name not in self.threads
            and n.parents <= self.done
        ]
        if self.ranks is None:
            return ready
        # Serial: one node at a time, PRE script to POST script, its retries in its turn.
        return [] if self.threads or not ready else [min(ready, key=self.ranks.__getitem__)]

    def _start(self, name: str) -> None:
        ctx = NodeContext(
            scratch_root=self.work / "sandbox",
            cancel=self.cancel,
            acquire_slot=self.pool.acquire,
            release_slot=self.pool.release,
            next_cluster=self.next_cluster,
            dag_status=self.dag_status,
            emit=lambda *a: self.inbox.put(("emit", *a)),
            set_state=lambda *a: self.inbox.put(("state", *a)),
            slot_environment=self.slot_environment,
            warm=self.warm,
            evictions=self.evictions,
        )
        runner = NodeRunner(self.dag.nodes[name], ctx)

        def body() -> None:
            try:
                self.inbox.put(("finished", name, runner.run()))
            except BaseException as exc:  # reported to the main thread, which re-raises
                self.inbox.put(("error", name, exc))

        self._set_state(name, READY)
        thread = threading.Thread(target=body, name=f"node-{name}", daemon=True)
        self.threads[name] = thread
        thread.start()

    def _finished(self, name: str, outcome: Outcome, journal: Journal) -> None:
        self.threads.pop(name).join()
        if self.interrupted is not None and not outcome.ok:
            self._set_state(name, NOT_READY)  # stopped by us: neither done nor failed
            return
        if outcome.ok:
            self.done.add(name)
            if not self.dag.nodes[name].final:
                journal.done(name)
            self._set_state(name, DONE, "", outcome.attempts - 1)
            self._emit(name, "done", outcome.attempts - 1, outcome.code)
            return
        self.failed[name] = outcome.code
        self._set_state(name, ERROR, f"exit {outcome.code}", outcome.attempts - 1)
        self._emit(name, "failed", outcome.attempts - 1, outcome.code)
        if outcome.abort and self.aborted is None:
            self.aborted = (name, outcome.code)
            self.cancel.set()

    def _handle(self, message: tuple, journal: Journal) -> None:
        kind = message[0]
        if kind == "emit":
            self._emit(*message[1:])
        elif kind == "state":
            self._set_state(*message[1:])
        elif kind == "finished":
            self._finished(message[1], message[2], journal)
        else:  # "error": a user mistake found by a node thread (bad submit file, ...)
            self.threads.pop(message[1]).join()
            self.error = self.error or message[2]
            self.cancel.set()

    def _write_status(self, final: bool = False) -> None:
        if self.dag.status_file is None:
            return
        now = time.time()
        if not final and now - self.last_status_write < self.dag.status_min_update:
            return
        self.last_status_write = now
        nodes = [self.states.get(name, NodeState(name, NOT_READY)) for name in self.dag.nodes]
        if final:
            overall = ERROR if self.failed or self.aborted or self.interrupted else DONE
        else:
            overall = status_file.SUBMITTED
        text = status_file.render(self.dag.path, overall, nodes, now + self.dag.status_min_update)
        status_file.write(self.dag.directory / self.dag.status_file, text)

    def _drain(self, journal: Journal) -> None:
        """Start ready nodes and process reports until nothing runs and nothing can start."""
        while True:
            if not self.cancel.is_set():
                ready = [self.dag.nodes[name] for name in self._ready()]
                for node in ready:
                    if node.pre is None:
                        self.pool.enlist(node)
                for node in ready:
                    self._start(node.name)
            if not self.threads:
                return
            try:
                message = self.inbox.get(timeout=0.5)
            except queue.Empty:
                self._write_status()
                continue
            self._handle(message, journal)
            self._write_status()

    def _futile(self) -> list[str]:
        futile = []
        for node in self.dag.nodes.values():
            if node.final or node.name in self.done or node.name in self.failed:
                continue
            futile.append(node.name)
            self._set_state(node.name, FUTILE)
        return futile

    def run(self) -> DagResult:
        self.work.mkdir(parents=True, exist_ok=True)
        # Scratch directories of jobs whose runner was killed (its jobs died with it); nothing
        # else uses them, as one runner at a time runs a DAG (pipeline.run_lock).
        shutil.rmtree(self.work / "sandbox", ignore_errors=True)
        self.done = self._initially_done()
        for name in self.done:
            self._set_state(name, DONE)
        journal = Journal(journal_path(self.dag.path))
        self._write_status(final=False)
        try:
            self._drain(journal)
            if self.error is not None:
                raise self.error
            futile = self._futile() if self.interrupted is None else []
            status, _ = self.dag_status()
            final = self.dag.final
            if final is not None and self.interrupted is None:
                self.cancel.clear()
                self._start(final)
                self._drain(journal)
                if self.error is not None:
                    raise self.error
        finally:
            self.cancel.set()
            if self.warm is not None:
                self.warm.close()
            self._write_status(final=True)
            journal.close(remove=self.interrupted is None and self.error is None)
        if self.interrupted is not None:
            name = signal.Signals(self.interrupted).name
            raise DagInterrupted(
                f"{self.dag.path.name}: stopped by {name}; {len(self.done)} node(s) finished and "
                "are recorded; run again to resume",
                128 + self.interrupted,
            )
        return self._result(status, futile)

    def _result(self, status: int, futile: list[str]) -> DagResult:
        final = self.dag.final
        if final is not None:
            ok = final in self.done
        else:
            ok = not self.failed and not futile and self.aborted is None
        exit_code = 0 if ok else 1
        if self.aborted is not None and not ok:
            node, code = self.aborted
            value = self.dag.nodes[node].abort_on[1]  # type: ignore[index]
            exit_code = code if value is None else value
        rescue = None
        if not ok:
            done = [n for n in self.dag.nodes if n in self.done and n != final]
            rescue = write_rescue(self.dag.path, done, sorted(self.failed), len(self.dag.nodes))
        return DagResult(
            ok=ok,
            exit_code=exit_code,
            dag_status=status,
            done=sorted(self.done),
            failed=sorted(self.failed),
            futile=futile,
            rescue_file=rescue,
        )

    def interrupt(self, signum: int, _frame: FrameType | None) -> None:
        self.interrupted = signum
        self.cancel.set()


def run_dag(
    dag_path: Path,
    slots: int,
    on_event: Callable[[NodeEvent], None] | None = None,
    slot_environment: dict[int, dict[str, str]] | None = None,
    serial: bool = False,
    warm_pythons: Collection[str] = (),
    evictions: Collection[tuple[int, float]] = (),
    repeated_evictions: dict[int, tuple[float, int]] | None = None,
) -> DagResult:
    """Run a DAG file locally as DAGMan + a schedd would; see the package docstring.

    `slot_environment` gives the jobs started in a slot (0..slots-1) extra environment
    variables, so one slot can play a different machine (e.g. a slower one). `serial` runs one
    node at a time in a fixed order (serial_order), so that the outcome never depends on
    timing: DAGMan makes no such promise, it is the local runner's own. Jobs that run the
    payload with one of `warm_pythons` start in a warm interpreter (warm_pool). `evictions`
    (slot, seconds) evict the job on that slot that many seconds after the run starts (slots:
    Evictions); it goes back to the queue and restarts from its checkpoint, if it took one.
    `repeated_evictions` (node -> seconds, times) evict each job whose VARS name the node
    that many seconds into each of its runs, `times` times ([faults] evict).
    """
    scheduler = _Scheduler(
        parse_dag(Path(dag_path)),
        slots,
        on_event,
        slot_environment or {},
        serial,
        frozenset(warm_pythons),
        Evictions(evictions, repeated_evictions) if evictions or repeated_evictions else None,
    )
    in_main = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, scheduler.interrupt)
    try:
        return scheduler.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
