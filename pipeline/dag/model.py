"""A DAGMan input file as typed objects, for both sides: the planner builds one and the writer
writes it; the local runner's parser reads one back. Names and paths are kept as the file writes
them; where the file lies is not part of what it says, so it is kept but never compared."""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path


@dataclass
class Script:
    """A PRE or POST script; arguments keep their $MACRO tokens until run time."""

    executable: str
    args: list[str]
    defer_status: int | None = None
    defer_time: int = 0


@dataclass(slots=True)
class Node:
    name: str
    submit: str  # the submit file as its JOB line names it, relative to `dir`
    dir: str = ""  # JOB ... DIR: where DAGMan runs condor_submit, relative to the DAG's folder
    final: bool = False
    done: bool = False
    vars: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    unless_exit: int | None = None
    pre: Script | None = None
    post: Script | None = None
    pre_skip: int | None = None
    category: str | None = None
    priority: int = 0
    abort_on: tuple[int, int | None] | None = None  # (status, DAG return value)
    comment: tuple[str, ...] = ()  # comment lines right above its JOB line
    parents: set[str] = field(default_factory=set)
    children: set[str] = field(default_factory=set)
    order: int = 0  # declaration order, which breaks ties between ready nodes
    root: Path = field(default=Path(), compare=False, repr=False)  # the DAG file's folder

    @property
    def directory(self) -> Path:
        """Where DAGMan would run condor_submit and the node's PRE and POST scripts."""
        return self.root / self.dir

    @property
    def submit_file(self) -> Path:
        return self.directory / self.submit


@dataclass
class Dag:
    path: Path = field(compare=False)  # the DAG file
    nodes: dict[str, Node] = field(default_factory=dict)
    comment: tuple[str, ...] = ()  # the header: comment lines at the top of the file
    final: str | None = None
    maxjobs: dict[str, int] = field(default_factory=dict)  # category -> node jobs at once
    status_file: str | None = None  # NODE_STATUS_FILE, relative to the DAG's folder
    status_min_update: int = 60
    config: str | None = None  # CONFIG file, relative to the DAG's folder
    max_jobs_submitted: int | None = None  # read from the CONFIG file

    @cached_property
    def directory(self) -> Path:
        return self.path.parent

    def add(self, node: Node) -> Node:
        """Declare a node (after the ones already declared); a FINAL node becomes the DAG's."""
        node.order, node.root = len(self.nodes), self.directory
        self.nodes[node.name] = node
        if node.final:
            self.final = node.name
        return node

    def connect(self, parents: Iterable[str], children: Iterable[str]) -> None:
        """PARENT parents CHILD children: every child waits for every parent."""
        nodes, children = self.nodes, list(children)
        for parent in parents:
            nodes[parent].children.update(children)
            for child in children:
                nodes[child].parents.add(parent)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Building, writing or reading a DAG of 100,000 nodes makes no reference cycles, yet the
    cyclic garbage collector would scan the growing heap over and over, about half the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
