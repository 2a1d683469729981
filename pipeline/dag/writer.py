"""One writer for every DAG: a `Dag` becomes DAGMan's input file, deterministically, in one pass.

The header comes first, then the settings (status file, CONFIG, MAXJOBS), then what every node
but the FINAL one shares, as DAGMan's `ALL_NODES` lines, then each node's block in declaration
order: its JOB line, one VARS line with the values that are its own, and the commands in which
it differs from the shared ones. Each PARENT/CHILD line follows the last block it names, so the
file never refers to a node ahead of its JOB line.

A setting is shared only when every node but the FINAL one has it (a later command can change a
node's setting but never remove it) and its most common value serves more than one node; a node
with another value gets its own line after the ALL_NODES one, which DAGMan's rule "the last
command that sets a property wins" makes its value. A VARS value is shared only when every node
holds the same one, since DAGMan warns when a node's variable is set twice.
"""

import io
import re
from collections import Counter
from operator import attrgetter
from pathlib import Path
from typing import TextIO

from .model import Dag, Node, Script, paused_gc

ALL_NODES = "ALL_NODES"
SHARED_COMMENT = "Every node but the FINAL one, unless its own lines below say otherwise:"
_CHUNK = 4096  # node blocks per write
_SPACE = re.compile(r"\s")
_ESCAPED = re.compile(r'[\\"\n\r]')  # what dag_var escapes or refuses

# A node's settings as (command head, value after its name): the line is "head name value".
Setting = tuple[str, str]


def dag_var(value: object) -> str:
    """A VARS value for DAGMan: inside double quotes, backslash and quote are escaped."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError(f"a VARS value cannot hold a line break: {text!r}")
    return text.replace("\\", "\\\\").replace('"', '\\"')


def write_dag(dag: Dag, path: Path) -> None:
    """Write the DAG file at `path`, streamed: never the whole text in memory."""
    with path.open("w") as out:
        _write(dag, out)


def dag_text(dag: Dag) -> str:
    out = io.StringIO()
    _write(dag, out)
    return out.getvalue()


def _write(dag: Dag, out: TextIO) -> None:
    with paused_gc():
        lines = [_comment(text) for text in dag.comment]
        if dag.status_file is not None:
            lines.append(f"NODE_STATUS_FILE {_word(dag.status_file)} {dag.status_min_update}")
        if dag.config is not None:
            lines.append(f"CONFIG {_word(dag.config)}")
        for category, limit in dag.maxjobs.items():
            lines += ["", f"# At most {limit} node jobs of category {category} at once."]
            lines.append(f"MAXJOBS {_word(category)} {limit}")
        nodes = sorted(dag.nodes.values(), key=attrgetter("order"))
        shared = _Shared([node for node in nodes if not node.final])
        lines += shared.lines()
        out.write("\n".join(lines) + "\n")
        edges = _edges_by_last_node(dag, nodes)
        block: list[str] = []
        for count, node in enumerate(nodes, start=1):
            shared.node_lines(node, block)
            for parents, children in edges.get(node.name, ()):
                block.append(f"PARENT {' '.join(parents)} CHILD {' '.join(children)}")
            if count % _CHUNK == 0:
                out.write("\n".join(block) + "\n")
                block = []
        if block:
            out.write("\n".join(block) + "\n")


def _settings(node: Node) -> dict[str, str]:
    """The node's commands other than JOB, VARS and PARENT/CHILD, in the order they are written."""
    settings: dict[str, str] = {}
    if node.pre is not None:
        head, value = _script("PRE", node.pre)
        settings[head] = value
    if node.pre_skip is not None:
        settings["PRE_SKIP"] = str(node.pre_skip)
    if node.post is not None:
        head, value = _script("POST", node.post)
        settings[head] = value
    if node.retries or node.unless_exit is not None:
        unless = f" UNLESS-EXIT {node.unless_exit}" if node.unless_exit is not None else ""
        settings["RETRY"] = f"{node.retries}{unless}"
    if node.category is not None:
        settings["CATEGORY"] = _word(node.category)
    if node.priority:
        settings["PRIORITY"] = str(node.priority)
    if node.abort_on is not None:
        status, value = node.abort_on
        settings["ABORT-DAG-ON"] = f"{status}{f' RETURN {value}' if value is not None else ''}"
    return settings


def _settings_key(node: Node) -> tuple[object, ...]:
    """What decides a node's settings; nodes built alike share their script objects, so their
    settings are worked out once (the scripts live as long as the DAG, so their ids are unique)."""
    pre, post = id(node.pre), id(node.post)
    return (
        pre,
        node.pre_skip,
        post,
        node.retries,
        node.unless_exit,
        node.category,
        node.priority,
        node.abort_on,
    )


def _script(kind: str, script: Script) -> Setting:
    defer = ""
    if script.defer_status is not None:
        defer = f"DEFER {script.defer_status} {script.defer_time} "
    return f"SCRIPT {defer}{kind}", " ".join([_word(script.executable), *map(_word, script.args)])


class _Shared:
    """What the nodes (all but the FINAL one) share: the ALL_NODES lines; and each node's own
    lines."""

    def __init__(self, nodes: list[Node]) -> None:
        node_keys = [_settings_key(node) for node in nodes]
        self.by_key: dict[tuple[object, ...], dict[str, str]] = {}
        for key, node in zip(node_keys, nodes, strict=True):
            if key not in self.by_key:
                self.by_key[key] = _settings(node)
        keys = Counter(node_keys)
        self.settings: dict[str, str] = {}
        heads = dict.fromkeys(head for settings in self.by_key.values() for head in settings)
        for head in heads:
            values: Counter[str | None] = Counter()
            for key, settings in self.by_key.items():
                values[settings.get(head)] += keys[key]
            value, count = values.most_common(1)[0]
            if count > 1 and _shareable(head, value, values):
                self.settings[head] = value
        self.own: dict[tuple[object, ...], list[Setting]] = {
            key: [
                (head, value)
                for head, value in settings.items()
                if self.settings.get(head) != value
            ]
            for key, settings in self.by_key.items()
        }
        names = [node.name for node in nodes]
        # each node's own settings, by name
        self.own_of = dict(zip(names, map(self.own.__getitem__, node_keys), strict=True))
        first = nodes[0].vars.items() if len(nodes) > 1 else ()
        self.vars = {
            key: value for key, value in first if all(n.vars.get(key) == value for n in nodes)
        }
        self.templates: dict[tuple[tuple[str, ...], bool], str] = {}
        self.job_words: dict[str, str] = {}  # by submit file, for nodes without DIR or DONE

    def lines(self) -> list[str]:
        if not self.settings and not self.vars:
            return []
        lines = ["", _comment(SHARED_COMMENT)]
        if self.vars:
            lines.append(f"VARS {ALL_NODES} {self.pairs(self.vars)}")
        lines += [f"{head} {ALL_NODES} {value}" for head, value in self.settings.items()]
        return lines

    def pairs(self, pairs: dict[str, str], shared: dict[str, str] | None = None) -> str:
        """name="value" words of the pairs, but those in `shared`."""
        keys = tuple(pairs)
        template = self.templates.get((keys, shared is None))
        if template is None:
            # nodes built alike have the same names in the same order: one template for them
            # (str.format takes the values of all, and uses those that are not shared)
            skip = shared or {}
            literal = {k: _word(k).replace("{", "{{").replace("}", "}}") for k in keys}
            words = [f'{literal[k]}="{{{i}}}"' for i, k in enumerate(keys) if k not in skip]
            template = self.templates[keys, shared is None] = " ".join(words)
        values = pairs.values()
        if _ESCAPED.search("".join(values)):
            values = map(dag_var, values)
        return template.format(*values)

    def node_lines(self, node: Node, lines: list[str]) -> None:
        """Append the node's block to `lines`."""
        name = node.name
        if not name or _SPACE.search(name):
            _word(name)
        if node.comment:
            lines += ["", *map(_comment, node.comment)]
        job = self.job_words.get(node.submit) if not (node.dir or node.done) else None
        if job is None:
            job = _job_words(node)
            if not (node.dir or node.done):
                self.job_words[node.submit] = job
        if node.final:
            lines.append(f"FINAL {name}{job}")
            if node.vars:
                lines.append(f"VARS {name} {self.pairs(node.vars)}")
            settings = _settings(node).items()
        else:
            lines.append(f"JOB {name}{job}")
            pairs = self.pairs(node.vars, self.vars)
            if pairs:
                lines.append(f"VARS {name} {pairs}")
            settings = self.own_of[name]
        for head, value in settings:
            lines.append(f"{head} {name} {value}")


def _job_words(node: Node) -> str:
    """What follows the name on a JOB line."""
    words = f" {_word(node.submit)}" + (f" DIR {_word(node.dir)}" if node.dir else "")
    return words + (" DONE" if node.done else "")


def _shareable(head: str, value: str | None, values: Counter[str | None]) -> bool:
    """Every node has the setting, and each other value can override the shared one: a RETRY
    without UNLESS-EXIT keeps the UNLESS-EXIT an earlier RETRY set."""
    if value is None or None in values:
        return False
    if head != "RETRY" or "UNLESS-EXIT" not in value:
        return True
    return all(other is not None and "UNLESS-EXIT" in other for other in values)


def _edges_by_last_node(
    dag: Dag, nodes: list[Node]
) -> dict[str, list[tuple[list[str], list[str]]]]:
    """Children that share their parents are one PARENT/CHILD group, placed after the block of
    the group's last-declared node."""
    groups: dict[object, tuple[set[str], list[str]]] = {}
    for node in nodes:
        parents = node.parents
        if parents:
            # one parent, the common case, is its own key: a name never equals a frozenset
            key = frozenset(parents) if len(parents) > 1 else next(iter(parents))
            group = groups.get(key)
            if group is None:
                group = groups[key] = (parents, [])
            group[1].append(node.name)
    placed: dict[str, list[tuple[list[str], list[str]]]] = {}
    for parent_set, children in groups.values():
        parents = sorted(parent_set, key=lambda name: dag.nodes[name].order)
        last = max(parents[-1], children[-1], key=lambda name: dag.nodes[name].order)
        placed.setdefault(last, []).append((parents, children))
    return placed


def _word(text: str) -> str:
    """A name, path or argument: DAGMan splits lines on whitespace, so it may hold none."""
    if not text or _SPACE.search(text):
        raise ValueError(f"a DAG file word cannot be empty or hold whitespace: {text!r}")
    return text


def _comment(text: str) -> str:
    if "\n" in text:
        raise ValueError(f"a comment line cannot hold a line break: {text!r}")
    return f"# {text}".rstrip()
