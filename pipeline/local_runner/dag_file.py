"""Parse a DAGMan input file into the DAG model, rejecting what the local runner cannot honour.

Only the subset of the DAG language that dagtrain generates (plus the usual companions) is
accepted; anything else is an error naming file and line, because silently skipping a command
would make a local run differ from a pool run. The comments at the top of the file and those
right above a JOB line are kept, as the writer puts them there.

As in DAGMan, node commands are applied after every JOB line is read, in file order, so the last
command that sets a node's property wins, and `ALL_NODES` in place of a node name (VARS, SCRIPT,
PRE_SKIP, RETRY, CATEGORY, PRIORITY, ABORT-DAG-ON) means every node but the FINAL one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from node_payload.common.errors import UserError
from pipeline.dag.model import Dag, Node, Script, paused_gc

KEYWORDS = {
    "JOB", "FINAL", "VARS", "PARENT", "CHILD", "RETRY", "SCRIPT", "PRE_SKIP", "CATEGORY",
    "MAXJOBS", "NODE_STATUS_FILE", "ABORT-DAG-ON", "PRIORITY", "CONFIG", "DOT", "DONE",
    "SUBDAG", "SPLICE", "INCLUDE", "SUBMIT-DESCRIPTION", "JOBSTATE_LOG", "SET_JOB_ATTR", "ENV",
    "SAVE_POINT_FILE", "CONNECT", "PIN_IN", "PIN_OUT", "REJECT", "PROVISIONER", "SERVICE",
    "ALL_NODES", "MAXPRE", "MAXPOST", "MAXHOLD", "EXTERNAL", "UNLESS-EXIT", "DEFER", "DEBUG",
    "PRE", "POST", "HOLD", "DIR", "NOOP", "RETURN",
}  # fmt: skip
# DAGMan configuration knobs that only tune how DAGMan talks to a schedd (submit pacing, log
# scanning); a local runner has neither, so they have no effect to reproduce.
INERT_CONFIG = {
    "DAGMAN_USER_LOG_SCAN_INTERVAL", "DAGMAN_MAX_SUBMITS_PER_INTERVAL", "DAGMAN_SUBMIT_DELAY",
    "DAGMAN_LOG_ON_NFS_IS_ERROR", "DAGMAN_PENDING_REPORT_INTERVAL", "DAGMAN_VERBOSITY",
    "DAGMAN_DEBUG", "DAGMAN_AGGRESSIVE_SUBMIT", "DAGMAN_SUPPRESS_NOTIFICATION",
}  # fmt: skip
ALL_NODES = "ALL_NODES"
_VAR = re.compile(r'\s*((?:[+]|[Mm][Yy]\.)?[A-Za-z0-9_]+)\s*=\s*"((?:[^"\\]|\\.)*)"')
# Commands that declare nodes or set the DAG's settings are applied at once; node commands after
# every JOB line, since they may name nodes declared later.
_AT_ONCE = {"JOB", "FINAL", "DOT", "CONFIG", "MAXJOBS", "NODE_STATUS_FILE"}


class _Parser:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.dag = Dag(path=path)
        self.lineno = 0
        self.comments: list[str] = []  # the comment lines since the last blank line or command
        self.in_header = True  # no blank line or command yet
        self.vars_keys: dict[tuple[str, ...] | None, list[str]] = {}  # cmd_VARS: by line shape

    def fail(self, message: str) -> UserError:
        return UserError(f"{self.path}:{self.lineno}: {message}")

    def parse(self, text: str) -> Dag:
        handlers = self.handlers()
        # node commands, applied once every node is declared (a local: a bound method the parser
        # held would make it a reference cycle of the file's size)
        deferred: list[tuple[int, Callable[[list[str], str], None], list[str], str]] = []
        for self.lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if line.startswith("#"):
                self.comments.append(line[2:] if line.startswith("# ") else line[1:])
                continue
            if self.in_header:
                self.dag.comment, self.comments = tuple(self.comments), []
                self.in_header = False
            if not line:
                self.comments = []
                continue
            words = line.split()
            keyword = words[0].upper()
            handler = handlers.get(keyword.replace("-", "_"))
            if keyword in _AT_ONCE:
                handlers[keyword](words, line)
            elif handler is not None:
                deferred.append((self.lineno, handler, words, line))
            elif keyword in KEYWORDS:
                raise self.fail(f"DAG command {keyword} is not supported by the local runner")
            else:
                raise self.fail(f"unknown DAG command {words[0]!r}")
            self.comments = []
        for lineno, handler, words, line in deferred:
            self.lineno = lineno
            handler(words, line)
        self.check_cycles()
        return self.dag

    def handlers(self) -> dict[str, Callable[[list[str], str], None]]:
        """Each command's handler, by its keyword with "-" as "_" (ABORT-DAG-ON, PRE_SKIP)."""
        return {name[4:]: getattr(self, name) for name in dir(self) if name.startswith("cmd_")}

    def node(self, name: str, *, final_ok: bool = True) -> Node:
        if name.upper() == ALL_NODES:
            raise self.fail("ALL_NODES cannot stand for a node here; name each node")
        node = self.dag.nodes.get(name)
        if node is None:
            raise self.fail(f"unknown node {name!r} (declare it with JOB first)")
        if node.final and not final_ok:
            raise self.fail(
                f"FINAL node {name!r} cannot be used with PARENT/CHILD, RETRY, ABORT-DAG-ON, "
                "PRIORITY, CATEGORY or DONE"
            )
        return node

    def targets(self, name: str, *, final_ok: bool = True) -> list[Node]:
        """The node a command names, or with ALL_NODES every node but the FINAL one."""
        node = self.dag.nodes.get(name)  # ALL_NODES is a keyword: never a node's name
        if node is not None and (final_ok or not node.final):
            return [node]
        if name.upper() == ALL_NODES:
            return [node for node in self.dag.nodes.values() if not node.final]
        return [self.node(name, final_ok=final_ok)]

    def int_arg(self, word: str, what: str) -> int:
        try:
            return int(word)
        except ValueError:
            raise self.fail(f"{what} must be an integer, got {word!r}") from None

    def cmd_JOB(self, words: list[str], line: str, final: bool = False) -> None:
        if len(words) < 3:
            raise self.fail(f"expected '{words[0]} name submitfile [DIR d] [DONE]'")
        name, submit = words[1], words[2]
        if name.upper() in KEYWORDS:
            raise self.fail(f"node name {name!r} is a DAG keyword; rename the node")
        if name in self.dag.nodes:
            raise self.fail(f"duplicate node name {name!r}")
        if final and self.dag.final is not None:
            raise self.fail("only one FINAL node is allowed")
        node = Node(name, submit, final=final, comment=tuple(self.comments))
        rest = words[3:]
        while rest:
            option = rest.pop(0).upper()
            if option == "DIR" and rest:
                node.dir = rest.pop(0)
            elif option == "DONE" and not final:
                node.done = True
            else:
                raise self.fail(f"unsupported {words[0]} option {option!r}")
        self.dag.add(node)

    def cmd_FINAL(self, words: list[str], line: str) -> None:
        self.cmd_JOB(words, line, final=True)

    def cmd_DOT(self, words: list[str], line: str) -> None:
        """DOT only asks DAGMan to draw the graph; nothing to run."""

    def cmd_CONFIG(self, words: list[str], line: str) -> None:
        if len(words) != 2:
            raise self.fail("expected 'CONFIG file'")
        self.dag.config = words[1]
        config = self.dag.directory / words[1]
        if not config.is_file():
            raise self.fail(f"CONFIG file {config} does not exist")
        for number, raw in enumerate(config.read_text().splitlines(), start=1):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            key, sep, value = text.partition("=")
            key = key.strip().upper()
            if sep and key == "DAGMAN_MAX_JOBS_SUBMITTED":
                self.dag.max_jobs_submitted = int(value.strip()) or None
            elif not (sep and key in INERT_CONFIG):
                raise UserError(
                    f"{config}:{number}: DAGMan setting {text!r} is not supported by the local "
                    f"runner (allowed: DAGMAN_MAX_JOBS_SUBMITTED, {', '.join(sorted(INERT_CONFIG))})"
                )

    def cmd_MAXJOBS(self, words: list[str], line: str) -> None:
        if len(words) != 3:
            raise self.fail("expected 'MAXJOBS category n'")
        self.dag.maxjobs[words[1]] = self.int_arg(words[2], "MAXJOBS limit")

    def cmd_NODE_STATUS_FILE(self, words: list[str], line: str) -> None:
        if len(words) not in (2, 3, 4) or (len(words) == 4 and words[3].upper() != "ALWAYS-UPDATE"):
            raise self.fail("expected 'NODE_STATUS_FILE file [min_update] [ALWAYS-UPDATE]'")
        self.dag.status_file = words[1]
        if len(words) >= 3:
            self.dag.status_min_update = self.int_arg(words[2], "minimum update time")

    def cmd_DONE(self, words: list[str], line: str) -> None:
        if len(words) != 2:
            raise self.fail("expected 'DONE node'")
        self.node(words[1], final_ok=False).done = True

    def cmd_VARS(self, words: list[str], line: str) -> None:
        if len(words) < 3:
            raise self.fail('expected VARS node name="value" ...')
        nodes = self.targets(words[1])
        if words[2].upper() in ("PREPEND", "APPEND"):
            raise self.fail("VARS PREPEND/APPEND is not supported by the local runner")
        rest = line.split(None, 2)[2]
        # Without escapes, the quotes split the line into its values and what surrounds them:
        # lines that look alike around their values (a layer's nodes) have the same keys.
        parts = rest.split('"')
        shape = tuple(parts[0::2]) if "\\" not in rest else None
        keys = self.vars_keys.get(shape)
        if keys is not None:
            pairs = dict(zip(keys, parts[1::2], strict=True))
        else:
            pairs = self.vars_pairs(rest)
            if shape is not None and 2 * len(pairs) + 1 == len(parts):
                self.vars_keys[shape] = list(pairs)
        for node in nodes:
            node.vars.update(pairs)

    def vars_pairs(self, rest: str) -> dict[str, str]:
        """A VARS line's pairs one by one: escapes undone, +name as MY.name, errors named."""
        pairs: dict[str, str] = {}
        while rest.strip():
            match = _VAR.match(rest)
            if match is None:
                raise self.fail(f'malformed VARS value near {rest.strip()!r}; use name="value"')
            key, value = match.group(1), match.group(2)
            if "\\" in value:
                value = re.sub(r"\\([\\\"])", r"\1", value)
            if key.lower().startswith("queue"):
                raise self.fail(f"VARS name {key!r} may not begin with 'queue'")
            if key.startswith("+"):
                key = "MY." + key[1:]
            pairs[key] = value
            rest = rest[match.end() :]
        return pairs

    def cmd_PARENT(self, words: list[str], line: str) -> None:
        upper = line.upper().split()
        if "CHILD" not in upper:
            raise self.fail("PARENT without CHILD")
        split = upper.index("CHILD")
        parents, children = words[1:split], words[split + 1 :]
        if not parents or not children:
            raise self.fail("expected 'PARENT p... CHILD c...'")
        nodes = self.dag.nodes
        named = [nodes.get(name) for name in parents + children]
        if any(node is None or node.final for node in named):
            for name in parents + children:
                self.node(name, final_ok=False)  # says which name is wrong
        self.dag.connect(parents, children)

    def cmd_RETRY(self, words: list[str], line: str) -> None:
        if len(words) not in (3, 5) or (len(words) == 5 and words[3].upper() != "UNLESS-EXIT"):
            raise self.fail("expected 'RETRY node n [UNLESS-EXIT code]'")
        retries = self.int_arg(words[2], "retry count")
        unless_exit = self.int_arg(words[4], "UNLESS-EXIT code") if len(words) == 5 else None
        for node in self.targets(words[1], final_ok=False):
            node.retries = retries
            if unless_exit is not None:  # a RETRY without it keeps an earlier one, as in DAGMan
                node.unless_exit = unless_exit

    def cmd_SCRIPT(self, words: list[str], line: str) -> None:
        rest = words[1:]
        defer_status, defer_time = None, 0
        if rest and rest[0].upper() == "DEFER":
            if len(rest) < 3:
                raise self.fail("expected 'SCRIPT DEFER status time PRE|POST ...'")
            defer_status = self.int_arg(rest[1], "DEFER status")
            defer_time = self.int_arg(rest[2], "DEFER time")
            rest = rest[3:]
        if len(rest) < 3 or rest[0].upper() not in ("PRE", "POST"):
            if rest and rest[0].upper() in ("HOLD", "DEBUG"):
                raise self.fail(f"SCRIPT {rest[0].upper()} is not supported by the local runner")
            raise self.fail("expected 'SCRIPT [DEFER status time] PRE|POST node exe [args]'")
        script = Script(rest[2], rest[3:], defer_status, defer_time)
        for node in self.targets(rest[1]):
            if rest[0].upper() == "PRE":
                node.pre = script
            else:
                node.post = script

    def cmd_PRE_SKIP(self, words: list[str], line: str) -> None:
        if len(words) != 3:
            raise self.fail("expected 'PRE_SKIP node exit-code'")
        code = self.int_arg(words[2], "PRE_SKIP exit code")
        for node in self.targets(words[1]):
            node.pre_skip = code

    def cmd_CATEGORY(self, words: list[str], line: str) -> None:
        if len(words) != 3:
            raise self.fail("expected 'CATEGORY node category'")
        for node in self.targets(words[1], final_ok=False):
            node.category = words[2]

    def cmd_PRIORITY(self, words: list[str], line: str) -> None:
        if len(words) != 3:
            raise self.fail("expected 'PRIORITY node value'")
        priority = self.int_arg(words[2], "priority")
        for node in self.targets(words[1], final_ok=False):
            node.priority = priority

    def cmd_ABORT_DAG_ON(self, words: list[str], line: str) -> None:
        if len(words) not in (3, 5) or (len(words) == 5 and words[3].upper() != "RETURN"):
            raise self.fail("expected 'ABORT-DAG-ON node status [RETURN value]'")
        value = self.int_arg(words[4], "RETURN value") if len(words) == 5 else None
        abort_on = (self.int_arg(words[2], "abort status"), value)
        for node in self.targets(words[1], final_ok=False):
            node.abort_on = abort_on

    def check_cycles(self) -> None:
        """Kahn's order reaches every node unless PARENT/CHILD has a cycle; then one is named."""
        nodes = self.dag.nodes
        waiting = {name: len(node.parents) for name, node in nodes.items()}
        reached = [name for name, count in waiting.items() if not count]
        for name in reached:  # grows as children become free
            for child in nodes[name].children:
                waiting[child] -= 1
                if not waiting[child]:
                    reached.append(child)
        if len(reached) < len(nodes):
            self.name_a_cycle()

    def name_a_cycle(self) -> None:
        state: dict[str, int] = {}
        for start in self.dag.nodes:
            stack = [(start, iter(sorted(self.dag.nodes[start].children)))]
            if state.get(start):
                continue
            state[start] = 1
            while stack:
                name, children = stack[-1]
                child = next(children, None)
                if child is None:
                    state[name] = 2
                    stack.pop()
                elif state.get(child) == 1:
                    raise UserError(f"{self.path}: cycle in PARENT/CHILD through node {child!r}")
                elif not state.get(child):
                    state[child] = 1
                    stack.append((child, iter(sorted(self.dag.nodes[child].children))))


def parse_dag(path: Path) -> Dag:
    """Read and validate a DAG file; node references may precede their JOB line, as in DAGMan."""
    path = path.resolve()
    if not path.is_file():
        raise UserError(f"DAG file {path} does not exist")
    with paused_gc():
        return _Parser(path).parse(path.read_text())
