"""Job slots: at most `slots` jobs at once, MAXJOBS per category, higher PRIORITY first.

Only jobs hold slots; PRE/POST scripts run outside them, as they run on the access point.
Slots are numbered 0..slots-1 and a job takes the lowest free one, so a slot can stand for one
machine of a heterogeneous pool (see `run_dag`'s slot_environment).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from pipeline.dag.model import Node


class SlotPool:
    """Slots and MAXJOBS places. A place is DAGMan's: a job holds it from its submission to its
    end, evictions included (an evicted job is still in the queue, idle), while a slot is an
    execute machine, which an evicted job gives back."""

    def __init__(self, slots: int, maxjobs: dict[str, int], cancel: threading.Event) -> None:
        self.slots = slots
        self.maxjobs = maxjobs
        self.cancel = cancel
        self.placed: dict[str | None, int] = {}
        self.holding: set[str] = set()  # nodes whose job keeps its place while it has no slot
        self.free = set(range(slots))
        self.waiting: list[Node] = []
        self.cond = threading.Condition()

    def _fits(self, node: Node) -> bool:
        if not self.free:
            return False
        limit = self.maxjobs.get(node.category or "")
        return (
            node.name in self.holding or limit is None or self.placed.get(node.category, 0) < limit
        )

    def _my_turn(self, node: Node) -> bool:
        """The best-ranked waiting node that fits gets the slot (priority, then DAG order)."""
        fitting = [n for n in self.waiting if self._fits(n)]
        return bool(fitting) and min(fitting, key=lambda n: (-n.priority, n.order)) is node

    def enlist(self, node: Node) -> None:
        """Queue a node before its thread starts, so ready nodes compete by priority rather
        than by which thread reaches `acquire` first."""
        with self.cond:
            self.waiting.append(node)

    def acquire(self, node: Node) -> int | None:
        """Block until this node may start its job: its slot, or None if the DAG is stopping
        (the job's place, if it kept one, is given up then)."""
        with self.cond:
            if node not in self.waiting:
                self.waiting.append(node)
            while not self._my_turn(node):
                if self.cancel.is_set():
                    self.waiting.remove(node)
                    self._leave(node)
                    self.cond.notify_all()
                    return None
                self.cond.wait(0.2)
            self.waiting.remove(node)
            if node.name in self.holding:
                self.holding.remove(node.name)
            else:
                self.placed[node.category] = self.placed.get(node.category, 0) + 1
            slot = min(self.free)
            self.free.remove(slot)
            self.cond.notify_all()
            return slot

    def release(self, node: Node, slot: int, keep_place: bool = False) -> None:
        """Give the slot back; an evicted job keeps its place (`keep_place`) to acquire a slot
        again."""
        with self.cond:
            self.free.add(slot)
            if keep_place:
                self.holding.add(node.name)
            else:
                self.placed[node.category] -= 1
            self.cond.notify_all()

    def _leave(self, node: Node) -> None:
        if node.name in self.holding:
            self.holding.remove(node.name)
            self.placed[node.category] -= 1


class Evictions:
    """When jobs are evicted, as when a desktop machine's owner comes back.

    `schedule` (slot, seconds; `dagtrain run --evict SLOT@SECONDS`): the job running on the
    slot that many seconds after the run started; each acts once, on the job running then, and
    a slot idle at that moment loses nothing. `repeat` (node -> seconds, times; `[faults]
    evict`): each job whose VARS name that node is evicted that many seconds into each of its
    runs, until it has been evicted `times` times.
    """

    def __init__(
        self,
        schedule: Iterable[tuple[int, float]],
        repeat: dict[int, tuple[float, int]] | None = None,
    ) -> None:
        self.start = time.monotonic()
        self.pending = sorted((at, slot) for slot, at in schedule)
        self.repeat = repeat or {}
        self.lock = threading.Lock()

    def due(self, slot: int, since: float, node: int | None, evicted: int) -> bool:
        """Whether the job of `node` placed on `slot` at `since` (time.monotonic), evicted
        `evicted` times before, is evicted now."""
        now = time.monotonic()
        if node in self.repeat:
            after, times = self.repeat[node]
            if evicted < times and now - since >= after:
                return True
        with self.lock:
            passed = [(at, s) for at, s in self.pending if s == slot and self.start + at <= now]
            for item in passed:
                self.pending.remove(item)
        return any(self.start + at >= since for at, _ in passed)
