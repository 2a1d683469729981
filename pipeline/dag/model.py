"""A DAGMan input file as typed objects, for both sides. The planner builds a `LayeredDag`: layers
of nodes that are alike but for their names and some VARS values (a round's node jobs), which the
writer writes at the cost of one formatted line per node. The local runner's parser reads a file
back as a `Dag`, node by node; a `LayeredDag` expands to the same `Dag`, and a `Dag` is a
`LayeredDag` of one-node layers. Names and paths are kept as the file writes them; where the file
lies is not part of what it says, so it is kept but never compared."""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import cached_property
from operator import attrgetter
from pathlib import Path


@dataclass
class Script:
    """A PRE or POST script; arguments keep their $MACRO tokens until run time."""

    executable: str
    args: list[str]
    defer_status: int | None = None
    defer_time: int = 0


@dataclass(slots=True, kw_only=True)
class NodeOptions:
    """What a node's lines say besides its name and VARS; a `Layer` gives it to all its nodes."""

    dir: str = ""  # JOB ... DIR: where DAGMan runs condor_submit, relative to the DAG's folder
    final: bool = False
    done: bool = False
    retries: int = 0
    unless_exit: int | None = None
    pre: Script | None = None
    post: Script | None = None
    pre_skip: int | None = None
    category: str | None = None
    priority: int = 0
    abort_on: tuple[int, int | None] | None = None  # (status, DAG return value)
    comment: tuple[str, ...] = ()  # comment lines right above its (first) JOB line


@dataclass(slots=True)
class Node(NodeOptions):
    name: str
    submit: str  # the submit file as its JOB line names it, relative to `dir`
    vars: dict[str, str] = field(default_factory=dict)
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
class DagSettings:
    """What a DAG file says before its nodes: the header and the DAG-wide settings."""

    path: Path = field(compare=False)  # the DAG file
    comment: tuple[str, ...] = ()  # the header: comment lines at the top of the file
    maxjobs: dict[str, int] = field(default_factory=dict)  # category -> node jobs at once
    status_file: str | None = None  # NODE_STATUS_FILE, relative to the DAG's folder
    status_min_update: int = 60
    config: str | None = None  # CONFIG file, relative to the DAG's folder
    max_jobs_submitted: int | None = None  # read from the CONFIG file

    @cached_property
    def directory(self) -> Path:
        return self.path.parent


@dataclass
class Dag(DagSettings):
    """The DAG node by node, as the local runner reads and runs it."""

    nodes: dict[str, Node] = field(default_factory=dict)
    final: str | None = None

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

    def layered(self) -> LayeredDag:
        """The same DAG as one-node layers, in declaration order, for the writer."""
        settings = {name: getattr(self, name) for name in _SETTINGS_FIELDS}
        layers = LayeredDag(**settings)
        order = {name: node.order for name, node in self.nodes.items()}
        for node in sorted(self.nodes.values(), key=attrgetter("order")):
            like = {name: getattr(node, name) for name in _LIKE_FIELDS}
            parents = sorted(node.parents, key=order.__getitem__)
            layers.layers.append(Layer([node.name], vars=dict(node.vars), parents=parents, **like))
        return layers


@dataclass(slots=True)
class Layer(NodeOptions):
    """Nodes declared one after another that are alike but for their names and some VARS values:
    a round's node jobs, say. A VARS value is one string for every node of the layer or a column
    of one per node; `comment` stands above the first node, and every node waits for each of
    `parents` (declared earlier or later)."""

    names: Sequence[str]
    submit: str
    vars: Mapping[str, str | Sequence[str]] = field(default_factory=dict)
    parents: Sequence[str] = ()

    def nodes(self) -> Iterator[Node]:
        """The layer's nodes, without their edges."""
        like = {name: getattr(self, name) for name in _LIKE_FIELDS if name != "comment"}
        for i, name in enumerate(self.names):
            values = {k: v if isinstance(v, str) else v[i] for k, v in self.vars.items()}
            comment = self.comment if i == 0 else ()
            yield Node(name, vars=values, comment=comment, **like)


@dataclass
class LayeredDag(DagSettings):
    """The DAG as the planner builds it and the writer writes it: layers in declaration order."""

    layers: list[Layer] = field(default_factory=list)

    def expand(self) -> Dag:
        """The same DAG node by node, as parsing its file gives it."""
        dag = Dag(**{name: getattr(self, name) for name in _SETTINGS_FIELDS})
        declared = [[dag.add(node).name for node in layer.nodes()] for layer in self.layers]
        for layer, names in zip(self.layers, declared, strict=True):
            dag.connect(layer.parents, names)  # a parent may be declared after its children
        return dag


# What a layer shares with each of its nodes, and what a Dag shares with a LayeredDag.
_LIKE_FIELDS = ["submit", *(f.name for f in fields(NodeOptions))]
_SETTINGS_FIELDS = [f.name for f in fields(DagSettings)]


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
