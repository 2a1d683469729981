"""A planned DAG run in virtual time with DAGMan's semantics, on a pool model.

DAGMan's part, as the local runner's scheduler plays it (pipeline/local_runner/scheduler.py): a
node is ready once all its parents are done; its PRE script runs first, and its PRE_SKIP code
marks it done without a job; its jobs are submitted at DAGMan's pace, at most MAXJOBS of a
category at once; its POST script decides success; a failed node is retried RETRY times unless
it exits with its UNLESS-EXIT code, then fails, and its descendants never run; the FINAL node runs
last, however the others ended. What the POST and PRE scripts decide comes from the code they
run: `aggregation.node_outcome.decide` for a finished job, `aggregation.quorum.required_updates`
for a round's aggregation, and the asynchronous ledger's claim and arrival rules
(aggregation/async_claim.py, async_apply.py), replayed here on a ledger in virtual time.

The pool's part: machines leave and come back (intervals.py), evicting the job they run, which
goes back to the queue and starts again from nothing (vanilla universe); the negotiator matches
idle jobs to free machines every cycle, and a finished job's claim starts the next idle job at
once; periodic_remove removes a job past its deadline (its node's $RETURN is then -1002); input
and output files queue for the submit host's link, data (and published models) for the mirrors'.
"""

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from aggregation.node_outcome import Verdict, decide
from aggregation.quorum import required_updates
from node_payload.common.errors import EXIT_FATAL, EXIT_OK, EXIT_RETRYABLE
from node_payload.common.run_layout import LANE_SCRIPT, NODE_SUBMIT
from pipeline.dag.model import Node, paused_gc

from . import intervals
from .links import Link
from .machines import FreeMachines, speeds
from .pool_model import PoolModel
from .trace import Trace
from .workload import Workload

_NO_DIR = Path()  # decide() names a job's folder only in its reasons, which are not simulated
REMOVED = -1002  # $RETURN of a job removed by periodic_remove (DAGMan: never completed)
_MB = 1e6  # bytes in the pool model's MB


@dataclass
class Job:
    """One attempt of a node's job: its queue date, where it runs, and what it did."""

    node: Node
    attempt: int
    qdate: float
    machine: int | None = None
    started: float = 0.0
    token: int = 0  # bumped on eviction, so the evicted run's events are void
    over: bool = False
    left: float = 1.0  # share of its training still to do: less after an eviction it resumes
    training: tuple[float, float] = (math.inf, 0.0)  # this run's training: (start, seconds)


@dataclass
class Ledger:
    """The asynchronous ledger's counts, as async_claim.claim and async_apply.arrive keep them."""

    version: int = 0
    accepted: int = 0
    buffered: int = 0
    started_at: float | None = None
    claims: dict[str, int] = field(default_factory=dict)  # node -> the version it was given


class Simulation:
    def __init__(self, work: Workload, pool: PoolModel, seed: int) -> None:
        self.work, self.pool, self.config = work, pool, work.config
        self.dag = work.dag
        self.rng = random.Random(seed)
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.now = 0.0
        self.trace = Trace()
        transfer = pool.transfer
        self.submit_link = Link(transfer.submit_host_mb_s, transfer.machine_mb_s)
        self.mirror_link = Link(transfer.mirrors_mb_s, transfer.machine_mb_s)
        self.speed = speeds(pool.machines, self.rng)
        self.free = FreeMachines(pool.machines.order, self.rng)
        self.available = [False] * pool.machines.count
        self.since = [0.0] * pool.machines.count  # when the machine last came (or was) on
        self.running: dict[int, Job] = {}  # machine -> its job
        self.idle: deque[Job] = deque()
        self.cycle_pending = False
        self.next_submit = 0.0
        self.waiting: dict[str, deque[Node]] = {}  # category -> nodes held back by MAXJOBS
        self.submitted: dict[str, int] = {}
        self.attempts: dict[str, int] = {}
        self.left = {name: len(n.parents) for name, n in self.dag.nodes.items()}
        self.accepted: set[str] = set()
        self.unresolved = sum(1 for n in self.dag.nodes.values() if not n.final)
        self.ledger = Ledger()
        self.lock_free_at = 0.0
        self.faults = self.config.faults
        self.slow = dict(self.faults.slow)
        submit, mirrors = work.job_bytes.through_submit_host, work.job_bytes.from_mirrors
        self.bytes_in = submit.model_in + submit.payload_in
        self.bytes_out = submit.update_out + submit.metrics_out
        self.bytes_fetched = mirrors.total
        self.starts: dict[str, float] = {}  # node: its accepted job's payload start
        self.futile: set[str] = set()
        self.warmed: set[int | None] = set()  # machines that have started a job

    # ----- the event queue -----
    def at(self, when: float, kind: str, item: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, kind, item))

    def run(self) -> Trace:
        self._machines_start()
        for node in self.dag.nodes.values():
            if not node.final and not node.parents:
                self._ready(node)
        handlers = {
            "pre": self._pre_done,
            "submitted": self._submitted,
            "cycle": self._cycle,
            "begin": self._begin,
            "computed": self._computed,
            "exited": self._exited,
            "local": self._local_exited,
            "post": self._post_done,
            "deadline": self._deadline,
            "toggle": self._toggle,
        }
        while self.events and self.unresolved:
            self.now, _, kind, item = heapq.heappop(self.events)
            handlers[kind](item)
        if self.dag.final is not None:
            self.now += self.pool.jobs.report_s
        for machine, on in enumerate(self.available):
            if on:
                self.trace.machine_available_s += self.now - self.since[machine]
        self.trace.end = self.now
        return self.trace

    # ----- availability -----
    def _machines_start(self) -> None:
        model = self.pool.availability
        always = model.on == "always"
        for machine in range(self.pool.machines.count):
            on = always or self.rng.random() < model.share_at_start
            self.available[machine] = on
            if on:
                self.free.add(machine)
            if not always:
                span = intervals.next_on if on else intervals.next_off
                self.at(span(self.rng, model), "toggle", machine)

    def _toggle(self, machine: int) -> None:
        model = self.pool.availability
        if self.available[machine]:
            self.available[machine] = False
            self.trace.machine_available_s += self.now - self.since[machine]
            self.free.discard(machine)
            job = self.running.pop(machine, None)
            if job is not None:
                self._evict(job)
            self.at(self.now + intervals.next_off(self.rng, model), "toggle", machine)
        else:
            self.available[machine] = True
            self.since[machine] = self.now
            self.free.add(machine)
            self._want_cycle()
            self.at(self.now + intervals.next_on(self.rng, model), "toggle", machine)

    def _evict(self, job: Job) -> None:
        """The owner is back: the job waits in the queue again, and starts again from nothing,
        or with `[train] checkpoint_s` from its last checkpoint (HTCondor's self-checkpointing:
        a checkpoint every checkpoint_s seconds of training goes back to the submit host)."""
        self.trace.evictions += 1
        saved = 0.0
        every = self.config.train.checkpoint_s
        start, seconds = job.training
        if every and self.now > start and seconds > 0:
            saved = min(seconds, (self.now - start) // every * every)
            job.left *= 1 - saved / seconds
        self._stop(job, saved)
        self.idle.appendleft(job)
        self._want_cycle()

    def _stop(self, job: Job, saved: float = 0.0) -> None:
        """The job leaves its machine without finishing: its run so far is lost, but for the
        training its checkpoints saved."""
        ran = max(0.0, self.now - job.started)
        self.trace.lost_s += ran - saved
        self.trace.saved_s += saved
        self.trace.machine_busy_s += ran
        job.machine, job.token, job.training = None, job.token + 1, (math.inf, 0.0)

    # ----- DAGMan: nodes -----
    def _ready(self, node: Node) -> None:
        if node.pre is not None:
            self.at(self.now + self.pool.jobs.script_s, "pre", node)
        else:
            self._throttle(node)

    def _pre_done(self, node: Node) -> None:
        """A lane's PRE script: claim the newest model, or skip the job (async_claim.claim)."""
        ledger, budget = self.ledger, self.config.update_budget
        if ledger.started_at is None:
            ledger.started_at = self.trace.first_claim = self.now
        time_budget = self.config.async_.time_budget_s
        in_flight = len(ledger.claims) - (node.name in ledger.claims)
        if ledger.accepted + in_flight >= budget or 0 < time_budget < self.now - ledger.started_at:
            self.trace.jobs_skipped += 1
            self._node_done(node)  # PRE_SKIP: done, without its job or POST script
            return
        ledger.claims[node.name] = ledger.version
        self._throttle(node)

    def _throttle(self, node: Node) -> None:
        """MAXJOBS: a category's jobs in the queue at once."""
        limit = self.dag.maxjobs.get(node.category or "")
        if limit is not None and self.submitted.get(node.category or "", 0) >= limit:
            self.waiting.setdefault(node.category or "", deque()).append(node)
            return
        self._submit(node)

    def _submit(self, node: Node) -> None:
        """condor_submit at DAGMan's pace: so many submissions per scan interval."""
        negotiation = self.pool.negotiation
        if node.category:
            self.submitted[node.category] = self.submitted.get(node.category, 0) + 1
        when = max(self.now, self.next_submit)
        self.next_submit = when + negotiation.submit_interval_s / negotiation.submits_per_interval
        job = Job(node, self.attempts.get(node.name, 0), when)
        if when == self.now:
            self._submitted(job)
        else:
            self.at(when, "submitted", job)

    def _submitted(self, job: Job) -> None:
        if job.node.submit != NODE_SUBMIT:  # local universe, on the submit host
            self._local_start(job)
            return
        deadline = job.qdate + self.config.run.node_deadline_s
        periodic = self.pool.negotiation.periodic_s
        if periodic > 0:
            deadline = (math.floor(deadline / periodic) + 1) * periodic
        self.at(deadline, "deadline", job)
        self.idle.append(job)
        self._want_cycle()

    def _left_queue(self, node: Node) -> None:
        category = node.category
        if not category:
            return
        self.submitted[category] -= 1
        waiting = self.waiting.get(category)
        if waiting:
            self._submit(waiting.popleft())

    def _post_start(self, job: Job, returned: int) -> None:
        self._left_queue(job.node)
        if job.node.post is None:
            self._resolve(job.node, returned)
            return
        jobs, node = self.pool.jobs, job.node
        if node.post.executable == LANE_SCRIPT and (
            returned == EXIT_OK or job.attempt >= node.retries
        ):
            # An arrival's script starts (arrive_s), then applies the update under the ledger's
            # lock (async_apply), one arrival at a time (apply_s).
            merge = self.work.update_bytes / (jobs.merge_mb_s * _MB)
            self.lock_free_at = max(self.now + jobs.arrive_s, self.lock_free_at) + jobs.apply_s
            self.lock_free_at += merge
            self.at(self.lock_free_at, "post", (job, returned))
            return
        self.at(self.now + jobs.script_s, "post", (job, returned))

    def _post_done(self, item: tuple[Job, int]) -> None:
        job, returned = item
        node = job.node
        outcome = decide(returned, job.attempt, node.retries, _NO_DIR)
        if node.submit != NODE_SUBMIT:  # an aggregation's POST script passes its code on
            self._resolve(node, returned)
        elif node.post is not None and node.post.executable == LANE_SCRIPT:
            self._arrive(job, outcome.verdict)
            self._resolve(node, outcome.exit_code)
        else:
            if outcome.verdict is Verdict.ACCEPT:
                self.accepted.add(node.name)
            self._resolve(node, outcome.exit_code)

    def _arrive(self, job: Job, verdict: Verdict) -> None:
        """A lane's POST script (async_apply.arrive), as it releases the ledger's lock."""
        if verdict is Verdict.RETRY:
            return  # the claim stays; the retry's PRE script claims the newest model
        ledger = self.ledger
        version = ledger.claims.pop(job.node.name, ledger.version)
        if verdict is not Verdict.ACCEPT:
            return
        ledger.accepted += 1
        ledger.buffered += 1
        self.trace.staleness.append(ledger.version - version)
        if (
            ledger.buffered >= self.config.async_.buffer
            or ledger.accepted >= self.config.update_budget
        ):
            ledger.version += 1
            ledger.buffered = 0
            self.trace.versions.append(self.now)

    def _resolve(self, node: Node, code: int) -> None:
        """DAGMan's verdict on a node from its POST script's (or job's) exit code."""
        if code == EXIT_OK:
            self._node_done(node)
            return
        attempt = self.attempts.get(node.name, 0)
        if attempt < node.retries and code != node.unless_exit:
            self.attempts[node.name] = attempt + 1
            self._ready(node)
            return
        self.unresolved -= 1
        self.trace.dag_ok = False
        self.trace.failed.append(node.name)
        self._futile(node)

    def _futile(self, failed: Node) -> None:
        """A failed node's descendants can never run (DAGMan marks them futile)."""
        todo = list(failed.children)
        while todo:
            name = todo.pop()
            if name in self.futile:
                continue
            self.futile.add(name)
            self.unresolved -= 1
            todo.extend(self.dag.nodes[name].children)

    def _node_done(self, node: Node) -> None:
        """Its children whose parents are all done become ready, in declaration order (a set's
        order would change with the interpreter's string hashing, and the run with it)."""
        self.unresolved -= 1
        nodes, left, ready = self.dag.nodes, self.left, []
        for name in node.children:
            left[name] -= 1
            if left[name] == 0:
                ready.append(nodes[name])
        if len(ready) > 1:
            ready.sort(key=_order)
        for child in ready:
            self._ready(child)

    # ----- the submit host's local universe: aggregations -----
    def _local_start(self, job: Job) -> None:
        node = job.node
        used = [p for p in node.parents if p in self.accepted]
        merge = len(used) * self.work.update_bytes / (self.pool.jobs.merge_mb_s * _MB)
        self.at(self.now + self.pool.jobs.aggregate_s + merge, "local", (job, used))

    def _local_exited(self, item: tuple[Job, list[str]]) -> None:
        job, used = item
        node = job.node
        round_ = int(node.vars.get("round", "0"))
        needed = required_updates(len(node.parents), self.config.run.quorum)
        starts = [self.starts[p] for p in used if p in self.starts]
        self.trace.rounds[round_] = (min(starts, default=self.now), self.now)
        self.trace.missing[round_] = len(node.parents) - len(used)
        self._post_start(job, EXIT_OK if len(used) >= needed else EXIT_FATAL)

    # ----- the pool: matching and running jobs -----
    def _want_cycle(self) -> None:
        if self.cycle_pending or not self.idle or not len(self.free):
            return
        self.cycle_pending = True
        interval = self.pool.negotiation.interval_s
        when = self.now if interval == 0 else (math.floor(self.now / interval) + 1) * interval
        self.at(when, "cycle")

    def _cycle(self, _item: object) -> None:
        """A negotiation cycle: idle jobs, oldest first, to free machines."""
        self.cycle_pending = False
        while self.idle and len(self.free):
            job = self.idle.popleft()
            if not job.over:
                self._start(job, self.free.take(), self.now)
        self._want_cycle()

    def _start(self, job: Job, machine: int, when: float) -> None:
        self.running[machine] = job
        job.machine, job.started = machine, when
        if when == self.now:
            self._begin((job, job.token))
        else:
            self.at(when, "begin", (job, job.token))

    def _begin(self, item: tuple[Job, int]) -> None:
        """Input files through the submit host, start-up, data from the mirrors, training."""
        job, token = item
        if token != job.token:
            return
        node, now = job.node, self.now
        self.trace.jobs_begun += 1
        ready = self.submit_link.send(now, self.bytes_in) + self.pool.jobs.startup_s
        if job.machine not in self.warmed:
            self.warmed.add(job.machine)
            ready += self.pool.jobs.first_startup_s
        fetched = self.mirror_link.send(ready, self.bytes_fetched)
        round_, index = int(node.vars.get("round", "0")), int(node.vars.get("node", "0"))
        if (round_, index) in self.faults.fail:
            self.at(ready, "exited", (job, token, EXIT_RETRYABLE, 0.0, ready))
            return
        if (round_, index) in self.faults.hang:
            return  # sleeps past the deadline: periodic_remove ends it
        train = job.left * self.work.steps * self.pool.jobs.step_s / self.speed[job.machine]
        train *= self.slow.get(index, 1.0)
        job.training = (fetched, train)
        self.at(fetched + train, "computed", (job, token, ready))

    def _computed(self, item: tuple[Job, int, float]) -> None:
        job, token, payload_start = item
        if token != job.token:
            return
        done = self.submit_link.send(self.now, self.bytes_out)
        self.at(done, "exited", (job, token, EXIT_OK, self.now - payload_start, payload_start))

    def _exited(self, item: tuple[Job, int, int, float, float]) -> None:
        job, token, code, seconds, payload_start = item
        if token != job.token or job.over:
            return
        job.over = True
        machine = job.machine
        assert machine is not None
        self.trace.machine_busy_s += self.now - job.started
        if code == EXIT_OK:
            self.trace.jobs_returned += 1
            index = int(job.node.vars.get("node", "0"))
            self.trace.busy[index] = self.trace.busy.get(index, 0.0) + seconds
            self.starts[job.node.name] = payload_start
        del self.running[machine]
        self._reuse_claim(machine)
        self._post_start(job, code)

    def _reuse_claim(self, machine: int) -> None:
        """The schedd keeps the claim for its next idle job; without one, the claim goes back."""
        while self.idle:
            job = self.idle.popleft()
            if not job.over:
                self._start(job, machine, self.now + self.pool.negotiation.claim_reuse_s)
                return
        self.free.add(machine)

    def _deadline(self, job: Job) -> None:
        """periodic_remove: idle or running past the deadline, the job is removed."""
        if job.over:
            return
        job.over = True
        if job.machine is not None:
            machine = job.machine
            self._stop(job)
            del self.running[machine]
            self._reuse_claim(machine)
        self._post_start(job, REMOVED)


def _order(node: Node) -> int:
    return node.order


def simulate(work: Workload, pool: PoolModel, seed: int = 0) -> Trace:
    """One simulated run of the planned DAG on the pool."""
    with paused_gc():
        return Simulation(work, pool, seed).run()
