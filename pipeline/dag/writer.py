"""One writer for every DAG: a `LayeredDag` (or a `Dag`, as one-node layers) becomes DAGMan's
input file, deterministically, in one streamed pass.

The header comes first, then the settings (status file, CONFIG, MAXJOBS), then what every node
but the FINAL one shares, as DAGMan's `ALL_NODES` lines, then each layer's nodes in declaration
order: a node's JOB line, one VARS line with the values that are its own, and the commands in
which it differs from the shared ones. A layer's nodes differ only in their names and some VARS
values, so the layer makes one template of its nodes' lines and each node costs one format of
it. A layer's PARENT/CHILD line follows the last block it names, so the file never refers to a
node ahead of its JOB line.

A setting is shared only when every node but the FINAL one has it (a later command can change a
node's setting but never remove it) and its most common value serves more than one node; a node
with another value gets its own line after the ALL_NODES one, which DAGMan's rule "the last
command that sets a property wins" makes its value. A VARS value is shared only when every node
holds the same one, since DAGMan warns when a node's variable is set twice.
"""

import io
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .model import Dag, Layer, LayeredDag, Script, paused_gc

ALL_NODES = "ALL_NODES"
SHARED_COMMENT = "Every node but the FINAL one, unless its own lines below say otherwise:"
_SPACE = re.compile(r"\s")
_ESCAPED = re.compile(r'[\\"\n\r]')  # what dag_var escapes or refuses

# A node's settings as (command head, value after its name): the line is "head name value".
Setting = tuple[str, str]
_UNEVEN = object()  # a VARS column whose values differ


def dag_var(value: object) -> str:
    """A VARS value for DAGMan: inside double quotes, backslash and quote are escaped."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError(f"a VARS value cannot hold a line break: {text!r}")
    return text.replace("\\", "\\\\").replace('"', '\\"')


def write_dag(dag: LayeredDag | Dag, path: Path) -> None:
    """Write the DAG file at `path`, streamed: never the whole text in memory."""
    with path.open("w") as out:
        _write(dag.layered() if isinstance(dag, Dag) else dag, out)


def dag_text(dag: LayeredDag | Dag) -> str:
    out = io.StringIO()
    _write(dag.layered() if isinstance(dag, Dag) else dag, out)
    return out.getvalue()


def _write(dag: LayeredDag, out: TextIO) -> None:
    with paused_gc():
        lines = [_comment(text) for text in dag.comment]
        if dag.status_file is not None:
            lines.append(f"NODE_STATUS_FILE {_word(dag.status_file)} {dag.status_min_update}")
        if dag.config is not None:
            lines.append(f"CONFIG {_word(dag.config)}")
        for category, limit in dag.maxjobs.items():
            lines += ["", f"# At most {limit} node jobs of category {category} at once."]
            lines.append(f"MAXJOBS {_word(category)} {limit}")
        shared = _Shared([layer for layer in dag.layers if not layer.final])
        lines += shared.lines()
        out.write("\n".join(lines) + "\n")
        edges = _Edges(out)
        for layer in dag.layers:
            out.write(shared.block(layer))
            edges.declared(layer)
        edges.check()


def _settings(layer: Layer) -> dict[str, str]:
    """The commands other than JOB, VARS and PARENT/CHILD of each node of the layer, in the order
    they are written."""
    settings: dict[str, str] = {}
    if layer.pre is not None:
        head, value = _script("PRE", layer.pre)
        settings[head] = value
    if layer.pre_skip is not None:
        settings["PRE_SKIP"] = str(layer.pre_skip)
    if layer.post is not None:
        head, value = _script("POST", layer.post)
        settings[head] = value
    if layer.retries or layer.unless_exit is not None:
        unless = f" UNLESS-EXIT {layer.unless_exit}" if layer.unless_exit is not None else ""
        settings["RETRY"] = f"{layer.retries}{unless}"
    if layer.category is not None:
        settings["CATEGORY"] = _word(layer.category)
    if layer.priority:
        settings["PRIORITY"] = str(layer.priority)
    if layer.abort_on is not None:
        status, value = layer.abort_on
        settings["ABORT-DAG-ON"] = f"{status}{f' RETURN {value}' if value is not None else ''}"
    return settings


def _settings_key(layer: Layer) -> tuple[object, ...]:
    """What decides a layer's settings; layers built alike share their script objects, so their
    settings are worked out once (the scripts live as long as the DAG, so their ids are unique)."""
    pre, post = id(layer.pre), id(layer.post)
    return (
        pre,
        layer.pre_skip,
        post,
        layer.retries,
        layer.unless_exit,
        layer.category,
        layer.priority,
        layer.abort_on,
    )


def _script(kind: str, script: Script) -> Setting:
    defer = ""
    if script.defer_status is not None:
        defer = f"DEFER {script.defer_status} {script.defer_time} "
    return f"SCRIPT {defer}{kind}", " ".join([_word(script.executable), *map(_word, script.args)])


class _Shared:
    """What the nodes (all but the FINAL one) share: the ALL_NODES lines; and each layer's block
    of its nodes' own lines."""

    def __init__(self, layers: list[Layer]) -> None:
        layer_keys = [_settings_key(layer) for layer in layers]
        self.by_key: dict[tuple[object, ...], dict[str, str]] = {}
        keys: Counter[tuple[object, ...]] = Counter()
        for key, layer in zip(layer_keys, layers, strict=True):
            if key not in self.by_key:
                self.by_key[key] = _settings(layer)
            keys[key] += len(layer.names)
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
        self.vars = _shared_vars(layers) if sum(keys.values()) > 1 else {}

    def lines(self) -> list[str]:
        if not self.settings and not self.vars:
            return []
        lines = ["", _comment(SHARED_COMMENT)]
        if self.vars:
            pairs = " ".join(f'{_word(k)}="{dag_var(v)}"' for k, v in self.vars.items())
            lines.append(f"VARS {ALL_NODES} {pairs}")
        lines += [f"{head} {ALL_NODES} {value}" for head, value in self.settings.items()]
        return lines

    def block(self, layer: Layer) -> str:
        """The layer's lines: its comment, then each node's JOB line and own lines. One template
        for them all, its fields the node's name and its VARS columns."""
        names = layer.names
        if not all(names) or _SPACE.search("".join(names)):
            for name in names:
                _word(name)
        shared = {} if layer.final else self.vars
        pairs, columns = [], []
        for key, value in layer.vars.items():
            if key in shared:
                continue
            if isinstance(value, str):
                pairs.append(f'{_literal(_word(key))}="{_literal(dag_var(value))}"')
            else:
                columns.append(_escaped(value))
                pairs.append(f'{_literal(_word(key))}="{{{len(columns)}}}"')
        settings = _settings(layer).items() if layer.final else self.own[_settings_key(layer)]
        template = "".join(
            [
                f"{'FINAL' if layer.final else 'JOB'} {{0}}{_literal(_job_words(layer))}",
                f"\nVARS {{0}} {' '.join(pairs)}" if pairs else "",
                *(f"\n{head} {{0}} {_literal(value)}" for head, value in settings),
            ]
        )
        lines = ["", *map(_comment, layer.comment)] if layer.comment else []
        lines += map(template.format, names, *columns)
        return "\n".join(lines) + "\n"


def _shared_vars(layers: list[Layer]) -> dict[str, str]:
    """The VARS values that every node holds: the first layer's values that every layer has."""
    uniform = [{k: _uniform(v) for k, v in layer.vars.items()} for layer in layers]
    first = uniform[0].items() if uniform else ()
    return {
        key: value
        for key, value in first
        if isinstance(value, str) and all(values.get(key) == value for values in uniform)
    }


def _uniform(value: str | Sequence[str]) -> object:
    """A VARS value for a whole layer: its string, or _UNEVEN when its nodes hold different ones."""
    if isinstance(value, str):
        return value
    distinct = set(value)
    return distinct.pop() if len(distinct) == 1 else _UNEVEN


def _escaped(column: Sequence[str]) -> Sequence[str]:
    """A VARS column as the file writes it (most columns need no escaping: checked at once)."""
    return list(map(dag_var, column)) if _ESCAPED.search("".join(column)) else column


class _Edges:
    """Writes each layer's PARENT/CHILD line once every node it names is declared."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.names: set[str] = set()
        self.waiting: dict[str, list[Layer]] = {}  # by a parent not declared yet

    def declared(self, layer: Layer) -> None:
        self.names.update(layer.names)
        ready = [layer] if layer.parents else []
        if self.waiting:
            ready += [each for name in layer.names for each in self.waiting.pop(name, ())]
        for each in ready:
            missing = next((name for name in each.parents if name not in self.names), None)
            if missing is None:
                parents, children = " ".join(each.parents), " ".join(each.names)
                self.out.write(f"PARENT {parents} CHILD {children}\n")
            else:
                self.waiting.setdefault(missing, []).append(each)

    def check(self) -> None:
        if self.waiting:
            raise ValueError(
                f"PARENT/CHILD names a node that is never declared: {min(self.waiting)!r}"
            )


def _job_words(layer: Layer) -> str:
    """What follows the name on a JOB line."""
    words = f" {_word(layer.submit)}" + (f" DIR {_word(layer.dir)}" if layer.dir else "")
    return words + (" DONE" if layer.done else "")


def _shareable(head: str, value: str | None, values: Counter[str | None]) -> bool:
    """Every node has the setting, and each other value can override the shared one: a RETRY
    without UNLESS-EXIT keeps the UNLESS-EXIT an earlier RETRY set."""
    if value is None or None in values:
        return False
    if head != "RETRY" or "UNLESS-EXIT" not in value:
        return True
    return all(other is not None and "UNLESS-EXIT" in other for other in values)


def _word(text: str) -> str:
    """A name, path or argument: DAGMan splits lines on whitespace, so it may hold none."""
    if not text or _SPACE.search(text):
        raise ValueError(f"a DAG file word cannot be empty or hold whitespace: {text!r}")
    return text


def _literal(text: str) -> str:
    """Text as a literal part of a str.format template."""
    return text.replace("{", "{{").replace("}", "}}")


def _comment(text: str) -> str:
    if "\n" in text:
        raise ValueError(f"a comment line cannot hold a line break: {text!r}")
    return f"# {text}".rstrip()
