"""The run configuration: one TOML file, validated key by key before anything is written.

Every key has a type, a default and a rule; an unknown key or a value that breaks a rule is a
UserError naming the table, the key, the value and what is allowed. The resolved config (every
key filled in) is what the run directory stores and what every job reads.
"""

import json
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node_payload.common.errors import UserError
from node_payload.fetch import Mirror

Rule = Callable[[Any], bool]


@dataclass(frozen=True)
class Key:
    """One config key: its type, default, rule, and the words that tell the user what is allowed."""

    kind: type | tuple[type, ...]
    default: Any
    allowed: str
    rule: Rule = lambda _value: True


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0 and math.isfinite(v)


def _between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def rule(v: float) -> bool:
        above = v > lo if lo_open else v >= lo
        below = v < hi if hi_open else v <= hi
        return above and below and math.isfinite(v)

    return rule


_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NAME_RULE = "1 to 64 of the characters A-Z a-z 0-9 . _ - (it names files and DAG lines)"


def _is_name(v: str) -> bool:
    return bool(_NAME.fullmatch(v)) and v not in {".", ".."}


def _fits_a_submit_line(v: str) -> bool:
    """Paths and image names are written into submit files: a newline or a quote would start a
    new command there."""
    return not any(c in v for c in "\"'") and all(c.isprintable() for c in v)


def _is_size(v: str) -> bool:
    number = v.rstrip("KMGTBkmgtb ")
    return number.replace(".", "", 1).isdigit()


def _ftp_urls(v: list) -> bool:
    try:
        for url in v:
            Mirror.parse(url)
    except (UserError, TypeError, AttributeError):
        return False
    return True


def _round_node_pairs(v: list) -> bool:
    return all(
        isinstance(p, list) and len(p) == 2 and all(type(i) is int and i >= 0 for i in p) for p in v
    )


def _round_node_factors(v: list) -> bool:
    return all(
        isinstance(t, list)
        and len(t) == 3
        and _round_node_pairs([t[:2]])
        and type(t[2]) in (int, float)
        and math.isfinite(t[2])
        for t in v
    )


def _node_slowdowns(v: list) -> bool:
    return all(
        isinstance(p, list)
        and len(p) == 2
        and type(p[0]) is int
        and p[0] >= 0
        and type(p[1]) in (int, float)
        and math.isfinite(p[1])
        and p[1] >= 1
        for p in v
    )


SCHEMA: dict[str, dict[str, Key]] = {
    "run": {
        "name": Key(str, "dagtrain", _NAME_RULE, _is_name),
        "mode": Key(
            str,
            "sync",
            '"sync" (rounds) or "async" (lanes; see [async])',
            lambda v: v in {"sync", "async"},
        ),
        "nodes": Key(int, 4, "an integer from 1 to 100000", _between(1, 100_000)),
        "rounds": Key(int, 6, "an integer from 1 to 100000", _between(1, 100_000)),
        "quorum": Key(float, 1.0, "a number in (0, 1]", _between(0, 1, lo_open=True)),
        "node_deadline_s": Key(int, 3600, "a positive number of seconds", _positive),
        "retries": Key(int, 2, "an integer from 0 to 20", _between(0, 20)),
        "max_node_jobs": Key(
            int,
            0,
            "node jobs in the queue at once, 0 for no limit (DAGMan MAXJOBS)",
            _between(0, 10**6),
        ),
        "seed": Key(int, 0, "a non-negative integer", lambda v: v >= 0),
        "run_id": Key(
            str,
            "",
            "filled in by the planner: tells this run's files from another's",
            lambda v: not v or _is_name(v),
        ),
    },
    "async": {
        "updates": Key(
            int,
            0,
            "the update budget: lanes stop once this many updates are applied "
            "(0: nodes x rounds, the work of the synchronous run)",
            _between(0, 10**7),
        ),
        "time_budget_s": Key(
            int, 0, "no new job starts after this many seconds (0: no limit)", lambda v: v >= 0
        ),
        "lane_jobs": Key(
            int,
            0,
            "the most jobs one lane may run (0: 4x its share of the budget, at most the budget)",
            lambda v: v >= 0,
        ),
        "buffer": Key(
            int,
            1,
            "apply a server step every K arrivals (1: FedAsync, each update at once; >1: FedBuff)",
            _between(1, 10**5),
        ),
        "staleness": Key(
            str,
            "polynomial",
            '"constant", "polynomial" ((1+s)^-a) or "hinge" (1 up to b, then 1/(a(s-b)+1))',
            lambda v: v in {"constant", "polynomial", "hinge"},
        ),
        "staleness_a": Key(float, 0.5, "a non-negative number", lambda v: v >= 0),
        "staleness_b": Key(int, 4, "a non-negative integer", lambda v: v >= 0),
        "evaluations": Key(
            int,
            25,
            "held-out evaluations of model versions in the report (at most this many)",
            _between(1, 10**4),
        ),
    },
    "data": {
        "source": Key(str, "", "a directory with one sub-folder of images per class"),
        "dataset": Key(str, "", "the directory of the prepared dataset (default: SOURCE.prepared)"),
        "tile": Key(int, 64, "an integer from 8 to 4096", _between(8, 4096)),
        "overlap": Key(float, 0.5, "a number from 0 to 0.9", _between(0, 0.9)),
        "holdout": Key(float, 0.25, "a number in (0, 0.9]", _between(0, 0.9, lo_open=True)),
        "angles": Key(
            str,
            "0:360:90",
            'rotations "start:stop:step" in whole degrees, stop exclusive (e.g. "0:360:5")',
            lambda v: (
                len(p := v.split(":")) == 3
                and all(x.isdigit() for x in p)
                and int(p[0]) < int(p[1]) <= 360
                and int(p[2]) >= 1
            ),
        ),
        "skip_bad_images": Key(
            bool,
            False,
            "true: preparing skips (and names) unreadable images instead of stopping at the first",
        ),
        "lossless": Key(
            bool, False, "true: PNG blocks; false: JPEG quality 90 (about 10x smaller)"
        ),
        "node_cache": Key(
            str,
            "",
            "a directory on execute nodes keeping verified blocks between rounds (empty: off)",
            _fits_a_submit_line,
        ),
        "local_train": Key(int, 384, "a positive number of fragments", _positive),
        "local_test": Key(int, 96, "a positive number of fragments", _positive),
        "heldout_test": Key(int, 600, "at most this many held-out fragments", _positive),
        "mirrors": Key(list, [], "a list of ftp:// URLs (empty: embedded mirrors)", _ftp_urls),
        "embedded_mirrors": Key(int, 2, "an integer from 1 to 16", _between(1, 16)),
        "embedded": Key(bool, False, "set by the planner: true when dagtrain serves the mirrors"),
        "manifest_sha256": Key(str, "", "filled in by the planner"),
    },
    "model": {
        "arch": Key(str, "smallcnn", '"smallcnn" or a torchvision classifier name', _is_name),
        "in_channels": Key(int, 0, "1 or 3 (0: from the dataset)", lambda v: v in (0, 1, 3)),
        "image_size": Key(
            int, 0, "an integer from 8 to 1024 (0: the tile size)", _between(0, 1024)
        ),
    },
    "train": {
        "local_steps": Key(int, 0, "a positive integer (or set local_epochs)", lambda v: v >= 0),
        "local_epochs": Key(float, 0.0, "a positive number (or set local_steps)", lambda v: v >= 0),
        "batch_size": Key(int, 32, "an integer from 1 to 4096", _between(1, 4096)),
        "lr": Key(float, 0.05, "a positive number", _positive),
        "lr_schedule": Key(
            str,
            "cosine",
            '"constant" or "cosine" (over rounds)',
            lambda v: v in {"constant", "cosine"},
        ),
        "momentum": Key(float, 0.9, "a number in [0, 1)", _between(0, 1, hi_open=True)),
        "weight_decay": Key(float, 5e-4, "a non-negative number", lambda v: v >= 0),
        "augment": Key(bool, True, "true or false"),
    },
    "server": {
        "optimizer": Key(
            str,
            "sgd",
            '"sgd" (with momentum and nesterov) or "adam" (FedAdam: use a small lr, e.g. 0.01)',
            lambda v: v in {"sgd", "adam"},
        ),
        "lr": Key(float, 1.0, "a positive number", _positive),
        "momentum": Key(float, 0.0, "a number in [0, 1)", _between(0, 1, hi_open=True)),
        "nesterov": Key(bool, False, "true or false"),
        "beta1": Key(
            float, 0.9, "Adam's first-moment decay, in [0, 1)", _between(0, 1, hi_open=True)
        ),
        "beta2": Key(
            float, 0.99, "Adam's second-moment decay, in [0, 1)", _between(0, 1, hi_open=True)
        ),
        "eps": Key(float, 1e-3, "Adam's tau: a positive number", _positive),
        "max_update_norm": Key(float, 1000.0, "a positive number", _positive),
        "rule": Key(
            str,
            "mean",
            '"mean" (weighted by samples), "median" or "trimmed_mean" (coordinate-wise)',
            lambda v: v in {"mean", "median", "trimmed_mean"},
        ),
        "trim": Key(
            float,
            0.2,
            "the fraction cut at each end by trimmed_mean, in [0, 0.5)",
            _between(0, 0.5, hi_open=True),
        ),
        "clip_norm": Key(
            float,
            0.0,
            "updates with a larger L2 norm are scaled down to it (0: off)",
            _non_negative,
        ),
    },
    "compression": {
        "method": Key(
            str,
            "none",
            '"none" (dense updates) or "dgc" (Deep Gradient Compression: top-k of each parameter '
            "tensor, the rest kept per lane as an error-feedback residual)",
            lambda v: v in {"none", "dgc"},
        ),
        "sparsity": Key(
            float,
            0.999,
            "the fraction of each parameter tensor's values a node does not send, in [0, 1)",
            _between(0, 1, hi_open=True),
        ),
        "warmup": Key(
            int,
            4,
            "a lane's first jobs, over which the sparsity rises from 0.75 to its target "
            "(0 to 1000; 0: none)",
            _between(0, 1000),
        ),
        "momentum": Key(
            float,
            0.0,
            "momentum correction at the nodes, in [0, 1) (0.9 as in DGC, then keep [server] "
            "momentum 0)",
            _between(0, 1, hi_open=True),
        ),
        "clip_norm": Key(
            float,
            0.0,
            "a node scales its update down to this L2 norm before compressing it (0: off)",
            _non_negative,
        ),
    },
    "resources": {
        "request_cpus": Key(int, 1, "an integer from 1 to 256", _between(1, 256)),
        "request_memory": Key(str, "2GB", 'a size such as "2GB" or "1500MB"', _is_size),
        "request_disk": Key(str, "1GB", 'a size such as "1GB"', _is_size),
        "request_gpus": Key(int, 0, "an integer from 0 to 16", _between(0, 16)),
    },
    "faults": {
        "fail": Key(list, [], "a list of [round, node] pairs", _round_node_pairs),
        "hang": Key(list, [], "a list of [round, node] pairs", _round_node_pairs),
        "scale": Key(
            list,
            [],
            "a list of [round, node, factor]: the node's update times factor (-1: sign flip)",
            _round_node_factors,
        ),
        "nan": Key(
            list, [], "a list of [round, node] pairs: a NaN in the update", _round_node_pairs
        ),
        "slow": Key(
            list,
            [],
            "a list of [node, factor >= 1]: the node works factor times as long in every round",
            _node_slowdowns,
        ),
    },
    "execution": {
        "python": Key(
            str,
            "",
            "an absolute path to a Python with torch on the execute nodes (inside the container "
            "with container_image; default: the planner's own Python, or /usr/bin/python3 in a "
            "container)",
            _fits_a_submit_line,
        ),
        "container_image": Key(
            str,
            "",
            'an image for HTCondor\'s container_image ("docker://..." or a .sif path)',
            _fits_a_submit_line,
        ),
        "env_tarball": Key(
            str,
            "",
            "a .tar.gz of a Python environment with torch (conda-pack or venv)",
            _fits_a_submit_line,
        ),
        "submit_python": Key(
            str,
            "",
            "an absolute path to a Python with torch on the submit host, for the aggregation and "
            "report jobs (default: the planner's own Python)",
            _fits_a_submit_line,
        ),
    },
}


@dataclass
class Config:
    """A validated config: table -> key -> value, plus where it came from (for messages)."""

    values: dict[str, dict[str, Any]]
    origin: str = "<config>"
    base_dir: Path = field(default_factory=Path.cwd)

    def __getitem__(self, table: str) -> dict[str, Any]:
        return self.values[table]

    def path(self, table: str, key: str) -> Path:
        """A path key, relative paths taken from the config file's folder."""
        return (self.base_dir / self.values[table][key]).resolve()


def _check_value(origin: str, table: str, name: str, key: Key, value: Any) -> Any:
    where = f"{origin}: [{table}] {name} = {value!r}"
    kinds = key.kind if isinstance(key.kind, tuple) else (key.kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in kinds:
        raise UserError(f"{where} is not allowed; expected {key.allowed}")
    if not isinstance(value, kinds):
        raise UserError(f"{where} has the wrong type; expected {key.allowed}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where} is not a finite number; expected {key.allowed}")
    if not key.rule(value):
        raise UserError(f"{where} is not allowed; expected {key.allowed}")
    return value


def from_dict(
    raw: dict[str, Any], origin: str = "<config>", base_dir: Path | None = None
) -> Config:
    """Validate a parsed TOML document and fill in every default."""
    values: dict[str, dict[str, Any]] = {}
    for table in raw:
        if table not in SCHEMA:
            raise UserError(
                f"{origin}: unknown table [{table}]; allowed tables: {', '.join(SCHEMA)}"
            )
        if not isinstance(raw[table], dict):
            raise UserError(f"{origin}: {table} must be a table ([{table}])")
    for table, keys in SCHEMA.items():
        given = raw.get(table, {})
        for name in given:
            if name not in keys:
                raise UserError(
                    f"{origin}: unknown key [{table}] {name}; allowed keys in [{table}]: "
                    f"{', '.join(keys)}"
                )
        values[table] = {
            name: _check_value(origin, table, name, key, given[name])
            if name in given
            else _copy_default(key.default)
            for name, key in keys.items()
        }
    config = Config(values, origin, (base_dir or Path.cwd()).resolve())
    _check_relations(config)
    return config


def _copy_default(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _check_relations(config: Config) -> None:
    """Rules that involve two keys; single-key rules live in SCHEMA."""
    origin = config.origin
    train = config["train"]
    if train["local_steps"] and train["local_epochs"]:
        raise UserError(
            f"{origin}: [train] sets both local_steps and local_epochs; set only one of them"
        )
    if not train["local_steps"] and not train["local_epochs"]:
        train["local_steps"] = 40
    data = config["data"]
    if not data["source"] and not data["dataset"]:
        raise UserError(
            f"{origin}: [data] needs source (a folder of class folders of images) or dataset "
            "(a prepared dataset folder)"
        )
    execution = config["execution"]
    for key in ("python", "submit_python"):
        if execution[key] and not execution[key].startswith("/"):
            raise UserError(
                f"{origin}: [execution] {key} = {execution[key]!r} must be an absolute path"
            )
    if execution["container_image"] and execution["env_tarball"]:
        raise UserError(
            f"{origin}: [execution] sets both container_image and env_tarball; a node job finds "
            "Python one way: choose one"
        )
    if execution["env_tarball"] and execution["python"]:
        raise UserError(f"{origin}: [execution] env_tarball brings its own Python; remove python")


def load(path: Path) -> Config:
    """Read and validate a TOML config file."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(raw, str(path), path.parent)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string once DEL, which TOML also escapes, is escaped.
        return json.dumps(value).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: Config) -> str:
    """The resolved config as TOML, in schema order so runs diff cleanly."""
    lines = ["# Resolved dagtrain config: every key filled in. Jobs read this file.", ""]
    for table, keys in SCHEMA.items():
        lines.append(f"[{table}]")
        lines.extend(f"{name} = {_toml_value(config[table][name])}" for name in keys)
        lines.append("")
    return "\n".join(lines)


def reference_table() -> str:
    """Markdown table of every key, generated so the README and the code cannot drift."""
    rows = ["| key | default | allowed |", "|---|---|---|"]
    for table, keys in SCHEMA.items():
        for name, key in keys.items():
            rows.append(f"| `[{table}] {name}` | `{_toml_value(key.default)}` | {key.allowed} |")
    return "\n".join(rows)
