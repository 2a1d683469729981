"""One writer for every DAG: a `Dag` becomes DAGMan's input file, deterministically.

The header comes first, then the settings (status file, CONFIG, MAXJOBS), then each node's
block in declaration order; each PARENT/CHILD line follows the last block it names, so the file
never refers to a node ahead of its JOB line. VARS and PARENT/CHILD lines, which DAGMan lets a
node repeat, are wrapped to WIDTH characters; the other commands are one line each by syntax.
"""

from collections.abc import Iterator, Sequence

from .model import Dag, Node, Script

WIDTH = 99


def dag_var(value: object) -> str:
    """A VARS value for DAGMan: inside double quotes, backslash and quote are escaped."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError(f"a VARS value cannot hold a line break: {text!r}")
    return text.replace("\\", "\\\\").replace('"', '\\"')


def dag_text(dag: Dag) -> str:
    lines = [_comment(text) for text in dag.comment]
    if dag.status_file is not None:
        lines.append(f"NODE_STATUS_FILE {_word(dag.status_file)} {dag.status_min_update}")
    if dag.config is not None:
        lines.append(f"CONFIG {_word(dag.config)}")
    for category, limit in dag.maxjobs.items():
        lines += ["", f"# At most {limit} node jobs of category {category} at once."]
        lines.append(f"MAXJOBS {_word(category)} {limit}")
    edges = _edges_by_last_node(dag)
    for node in sorted(dag.nodes.values(), key=lambda n: n.order):
        lines += _node_lines(node)
        for parents, children in edges.get(node.name, []):
            lines += _edge_lines(parents, children)
    return "\n".join(lines) + "\n"


def _node_lines(node: Node) -> list[str]:
    name = _word(node.name)
    lines = ["", *map(_comment, node.comment)] if node.comment else []
    job = f"{'FINAL' if node.final else 'JOB'} {name} {_word(node.submit)}"
    job += f" DIR {_word(node.dir)}" if node.dir else ""
    lines.append(job + (" DONE" if node.done else ""))
    pairs = [f'{_word(key)}="{dag_var(value)}"' for key, value in node.vars.items()]
    lines += _packed(f"VARS {name}", pairs, WIDTH)
    if node.pre is not None:
        lines.append(_script("PRE", name, node.pre))
    if node.pre_skip is not None:
        lines.append(f"PRE_SKIP {name} {node.pre_skip}")
    if node.post is not None:
        lines.append(_script("POST", name, node.post))
    if node.retries or node.unless_exit is not None:
        unless = f" UNLESS-EXIT {node.unless_exit}" if node.unless_exit is not None else ""
        lines.append(f"RETRY {name} {node.retries}{unless}")
    if node.category is not None:
        lines.append(f"CATEGORY {name} {_word(node.category)}")
    if node.priority:
        lines.append(f"PRIORITY {name} {node.priority}")
    if node.abort_on is not None:
        status, value = node.abort_on
        returning = f" RETURN {value}" if value is not None else ""
        lines.append(f"ABORT-DAG-ON {name} {status}{returning}")
    return lines


def _script(kind: str, name: str, script: Script) -> str:
    defer = ""
    if script.defer_status is not None:
        defer = f"DEFER {script.defer_status} {script.defer_time} "
    words = [_word(script.executable), *map(_word, script.args)]
    return f"SCRIPT {defer}{kind} {name} {' '.join(words)}"


def _edges_by_last_node(dag: Dag) -> dict[str, list[tuple[list[str], list[str]]]]:
    """Children that share their parents are one PARENT/CHILD group, placed after the block of
    the group's last-declared node."""
    groups: dict[frozenset[str], list[str]] = {}
    for node in sorted(dag.nodes.values(), key=lambda n: n.order):
        if node.parents:
            groups.setdefault(frozenset(node.parents), []).append(node.name)
    placed: dict[str, list[tuple[list[str], list[str]]]] = {}
    for parent_set, children in groups.items():
        parents = sorted(parent_set, key=lambda name: dag.nodes[name].order)
        last = max([*parents, *children], key=lambda name: dag.nodes[name].order)
        placed.setdefault(last, []).append((parents, children))
    return placed


def _edge_lines(parents: list[str], children: list[str]) -> list[str]:
    room = WIDTH - len("PARENT  CHILD ")
    lines = []
    for some_parents in _packs(parents, max(room // 2, room - len(" ".join(children)))):
        for some_children in _packs(children, room - len(" ".join(some_parents))):
            lines.append(f"PARENT {' '.join(some_parents)} CHILD {' '.join(some_children)}")
    return lines


def _packed(head: str, words: Sequence[str], width: int) -> list[str]:
    """`head` and the words, on as few lines of `width` characters as the words allow."""
    return [f"{head} {' '.join(pack)}" for pack in _packs(words, width - len(head) - 1)]


def _packs(words: Sequence[str], room: int) -> Iterator[list[str]]:
    pack: list[str] = []
    used = 0
    for word in words:
        if pack and used + 1 + len(word) > room:
            yield pack
            pack, used = [], 0
        used += len(word) + (1 if pack else 0)
        pack.append(word)
    if pack:
        yield pack


def _word(text: str) -> str:
    """A name, path or argument: DAGMan splits lines on whitespace, so it may hold none."""
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"a DAG file word cannot be empty or hold whitespace: {text!r}")
    return text


def _comment(text: str) -> str:
    if "\n" in text:
        raise ValueError(f"a comment line cannot hold a line break: {text!r}")
    return f"# {text}".rstrip()
