"""The run configuration: frozen, typed tables and the one schema of every key's default and rule.

Standard library only: every job reads the resolved config.toml with it on machines that have
no dagtrain. `parse` validates a user's TOML (an unknown key, or a value that breaks its rule, is
a UserError naming the file, the table, the key, the value and what is allowed) and fills in the
defaults. Facts derived from several keys (async mode, compression, the update budget, the
schedule length) are properties here, so they are computed in one place.
"""

import json
import math
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_origin

from node_payload.common.errors import UserError
from node_payload.common.mirror_url import Mirror

Rule = Callable[[Any], bool]


def _anything(_value: Any) -> bool:
    return True


def key(
    default: Any,
    allowed: str,
    rule: Rule = _anything,
    choices: str = "",
    async_default: Any = None,
) -> Any:
    """One config key: its default, the words that tell the user what is allowed, and its rule.

    `choices` names a registry of implementations (a combine rule, a server optimizer, a
    staleness function) whose names are the allowed values; the planner supplies it.
    `async_default`, when given, is the default of an asynchronous run ([run] mode = "async").
    """
    metadata = {"allowed": allowed, "rule": rule, "choices": choices}
    return field(default=default, metadata=metadata | {"async_default": async_default})


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


def _between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def rule(v: float) -> bool:
        above = v > lo if lo_open else v >= lo
        below = v < hi if hi_open else v <= hi
        return above and below

    return rule


def _one_of(*values: str) -> Rule:
    return lambda v: v in values


_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NAME_RULE = "1 to 64 of the characters A-Z a-z 0-9 . _ - (it names files and DAG lines)"


def is_name(v: str) -> bool:
    """Names reach DAG lines and file names: a space, newline or slash would change their meaning."""
    return bool(_NAME.fullmatch(v)) and v not in {".", ".."}


def _fits_a_submit_line(v: str) -> bool:
    """Paths and image names are written into submit files: a newline or a quote would start a
    new command there."""
    return not any(c in v for c in "\"'") and all(c.isprintable() for c in v)


def _is_size(v: str) -> bool:
    number = v.rstrip("KMGTBkmgtb ")
    return number.replace(".", "", 1).isdigit()


def _ftp_urls(v: tuple) -> bool:
    try:
        for url in v:
            Mirror.parse(url)
    except (UserError, TypeError, AttributeError):
        return False
    return True


def _publish_urls(v: tuple) -> bool:
    """Upload URLs reach config.toml, which every node job gets: a password would hand write
    access to every node, so it comes from ~/.netrc on the submit host instead."""
    return _ftp_urls(v) and not any(Mirror.parse(url).password for url in v)


def _is_count(v: Any) -> bool:
    return type(v) is int and v >= 0


def _is_finite_number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _round_node_pairs(v: tuple) -> bool:
    return all(isinstance(p, tuple) and len(p) == 2 and all(map(_is_count, p)) for p in v)


def _round_node_factors(v: tuple) -> bool:
    return all(
        isinstance(t, tuple)
        and len(t) == 3
        and _round_node_pairs((t[:2],))
        and _is_finite_number(t[2])
        for t in v
    )


def _node_slowdowns(v: tuple) -> bool:
    return all(
        isinstance(p, tuple)
        and len(p) == 2
        and _is_count(p[0])
        and _is_finite_number(p[1])
        and p[1] >= 1
        for p in v
    )


def _node_evictions(v: tuple) -> bool:
    return all(
        isinstance(p, tuple)
        and len(p) == 3
        and _is_count(p[0])
        and _is_finite_number(p[1])
        and p[1] > 0
        and _is_count(p[2])
        and p[2] >= 1
        for p in v
    )


def _angles(v: str) -> bool:
    parts = v.split(":")
    return (
        len(parts) == 3
        and all(x.isdigit() for x in parts)
        and int(parts[0]) < int(parts[1]) <= 360
        and int(parts[2]) >= 1
    )


@dataclass(frozen=True)
class RunTable:
    name: str = key("dagtrain", _NAME_RULE, is_name)
    mode: str = key(
        "sync", '"sync" (rounds) or "async" (lanes; see [async])', _one_of("sync", "async")
    )
    nodes: int = key(4, "an integer from 1 to 100000", _between(1, 100_000))
    rounds: int = key(6, "an integer from 1 to 100000", _between(1, 100_000))
    quorum: float = key(1.0, "a number in (0, 1]", _between(0, 1, lo_open=True))
    node_deadline_s: int = key(3600, "a positive number of seconds", _positive)
    retries: int = key(2, "an integer from 0 to 20", _between(0, 20))
    max_node_jobs: int = key(
        0, "node jobs in the queue at once, 0 for no limit (DAGMan MAXJOBS)", _between(0, 10**6)
    )
    seed: int = key(0, "a non-negative integer", _non_negative)
    run_id: str = key(
        "",
        "filled in by the planner: tells this run's files from another's",
        lambda v: not v or is_name(v),
    )


@dataclass(frozen=True)
class AsyncTable:
    updates: int = key(
        0,
        "the update budget: lanes stop once this many updates are applied (0: nodes x rounds)",
        _between(0, 10**7),
    )
    time_budget_s: int = key(
        0, "no new job starts after this many seconds (0: no limit)", _non_negative
    )
    lane_jobs: int = key(
        0,
        "the most jobs one lane may run (0: 4x its share of the budget, at most the budget)",
        _non_negative,
    )
    buffer: int = key(
        1,
        "apply a server step every K arrivals (1: FedAsync, each update at once; >1: FedBuff)",
        _between(1, 10**5),
    )
    staleness: str = key(
        "polynomial",
        "a stale update's weight (constant 1, polynomial (1+s)^-a, hinge 1/(a(s-b)+1) past b)",
        choices="staleness",
    )
    staleness_a: float = key(0.5, "a non-negative number", _non_negative)
    staleness_b: int = key(4, "a non-negative integer", _non_negative)
    mixing_schedule: str = key(
        "cosine",
        '"constant" or "cosine": the server lr (mixing weight) falls to 0 over the versions',
        _one_of("constant", "cosine"),
    )
    evaluations: int = key(
        25,
        "held-out evaluations of model versions in the report (at most this many)",
        _between(1, 10**4),
    )


@dataclass(frozen=True)
class DataTable:
    source: str = key("", "a directory with one sub-folder of images per class")
    dataset: str = key("", "the directory of the prepared dataset (default: SOURCE.prepared)")
    tile: int = key(64, "an integer from 8 to 4096", _between(8, 4096))
    overlap: float = key(0.5, "a number from 0 to 0.9", _between(0, 0.9))
    holdout: float = key(0.25, "a number in (0, 0.9]", _between(0, 0.9, lo_open=True))
    angles: str = key(
        "0:360:90",
        'rotations "start:stop:step" in whole degrees, stop exclusive (e.g. "0:360:5")',
        _angles,
    )
    skip_bad_images: bool = key(
        False,
        "true: preparing skips (and names) unreadable images instead of stopping at the first",
    )
    lossless: bool = key(False, "true: PNG blocks; false: JPEG quality 90 (about 10x smaller)")
    node_cache: str = key(
        "",
        "where execute nodes keep verified blocks (empty: off), residuals, models, payloads "
        "(empty: /var/tmp)",
        _fits_a_submit_line,
    )
    local_train: int = key(384, "a positive number of fragments", _positive)
    local_test: int = key(96, "a positive number of fragments", _positive)
    heldout_test: int = key(600, "at most this many held-out fragments", _positive)
    mirrors: tuple[str, ...] = key((), "a list of ftp:// URLs (empty: embedded mirrors)", _ftp_urls)
    publish: tuple[str, ...] = key(
        (),
        "ftp:// URLs where the first mirrors get the models (passwords: ~/.netrc; empty: file "
        "transfer)",
        _publish_urls,
    )
    embedded_mirrors: int = key(2, "an integer from 1 to 16", _between(1, 16))
    embedded: bool = key(False, "set by the planner: true when dagtrain serves the mirrors")
    manifest_sha256: str = key("", "filled in by the planner")


@dataclass(frozen=True)
class ModelTable:
    arch: str = key("smallcnn", '"smallcnn" or a torchvision classifier name', is_name)
    in_channels: int = key(0, "1 or 3 (0: from the dataset)", lambda v: v in (0, 1, 3))
    image_size: int = key(0, "an integer from 8 to 1024 (0: the tile size)", _between(0, 1024))


@dataclass(frozen=True)
class TrainTable:
    local_steps: int = key(40, "SGD steps per node job (0 when local_epochs is set)", _non_negative)
    local_epochs: float = key(
        0.0,
        "passes over the local data per node job, instead of local_steps (0: off)",
        _non_negative,
    )
    batch_size: int = key(32, "an integer from 1 to 4096", _between(1, 4096))
    lr: float = key(0.05, "a positive number", _positive)
    lr_schedule: str = key(
        "cosine",
        '"constant" or "cosine" (to 0 over the run\'s global steps: rounds x local steps)',
        _one_of("constant", "cosine"),
    )
    warmup: float = key(
        0.0,
        "the share of the schedule over which the lr rises linearly from 0, in [0, 0.5]",
        _between(0, 0.5),
    )
    momentum: float = key(0.9, "a number in [0, 1)", _between(0, 1, hi_open=True))
    nesterov: bool = key(False, "true: Nesterov momentum on the nodes")
    weight_decay: float = key(5e-4, "a non-negative number", _non_negative)
    augment: bool = key(True, "true or false")
    checkpoint_s: int = key(
        0,
        "seconds of training between a node job's checkpoints (self-checkpointing); 0: off",
        _non_negative,
    )


@dataclass(frozen=True)
class ServerTable:
    optimizer: str = key(
        "sgd",
        "the server's step on the combined update (adam: FedAdam, with a small lr)",
        choices="server_optimizers",
    )
    lr: float = key(
        1.0,
        "a positive number (asynchronous: FedAsync's mixing weight alpha)",
        _positive,
        async_default=0.6,
    )
    warmup: int = key(
        0,
        "server steps (rounds; versions when asynchronous) over which the server lr rises "
        "linearly, 0 to 1000",
        _between(0, 1000),
    )
    momentum: float = key(0.0, "a number in [0, 1)", _between(0, 1, hi_open=True))
    nesterov: bool = key(False, "true or false")
    beta1: float = key(0.9, "Adam's first-moment decay, in [0, 1)", _between(0, 1, hi_open=True))
    beta2: float = key(0.99, "Adam's second-moment decay, in [0, 1)", _between(0, 1, hi_open=True))
    eps: float = key(1e-3, "Adam's tau: a positive number", _positive)
    max_update_norm: float = key(1000.0, "a positive number", _positive)
    rule: str = key(
        "mean",
        "how updates combine (mean: weighted by samples; the others coordinate-wise)",
        choices="combine_rules",
    )
    trim: float = key(
        0.2,
        "the fraction cut at each end by trimmed_mean, in [0, 0.5)",
        _between(0, 0.5, hi_open=True),
    )
    clip_norm: float = key(
        0.0, "updates with a larger L2 norm are scaled down to it (0: off)", _non_negative
    )


@dataclass(frozen=True)
class CompressionTable:
    method: str = key(
        "none",
        "dense (none), top-k per tensor (dgc), every value in float16 or int8",
        choices="update_compression",
    )
    sparsity: float = key(
        0.999,
        "the fraction of each parameter tensor's values a node does not send, in [0, 1)",
        _between(0, 1, hi_open=True),
    )
    warmup: int = key(
        4,
        "a lane's first jobs, over which the sparsity rises from 0.75 to its target "
        "(0 to 1000; 0: none)",
        _between(0, 1000),
    )
    momentum: float = key(
        0.0,
        "momentum correction at the nodes, in [0, 1) (keep 0 with local momentum)",
        _between(0, 1, hi_open=True),
    )
    clip_norm: float = key(
        0.0,
        "a node scales its update down to this L2 norm before compressing it (0: off)",
        _non_negative,
    )


@dataclass(frozen=True)
class ResourcesTable:
    request_cpus: int = key(1, "an integer from 1 to 256", _between(1, 256))
    request_memory: str = key("2GB", 'a size such as "2GB" or "1500MB"', _is_size)
    request_disk: str = key("1GB", 'a size such as "1GB"', _is_size)
    request_gpus: int = key(0, "an integer from 0 to 16", _between(0, 16))


@dataclass(frozen=True)
class FaultsTable:
    fail: tuple[tuple[int, int], ...] = key((), "a list of [round, node] pairs", _round_node_pairs)
    hang: tuple[tuple[int, int], ...] = key((), "a list of [round, node] pairs", _round_node_pairs)
    scale: tuple[tuple[int, int, float], ...] = key(
        (),
        "a list of [round, node, factor]: the node's update times factor (-1: sign flip)",
        _round_node_factors,
    )
    nan: tuple[tuple[int, int], ...] = key(
        (), "a list of [round, node] pairs: a NaN in the update", _round_node_pairs
    )
    slow: tuple[tuple[int, float], ...] = key(
        (),
        "a list of [node, factor >= 1]: the node works factor times as long in every round",
        _node_slowdowns,
    )
    evict: tuple[tuple[int, float, int], ...] = key(
        (),
        "a list of [node, seconds > 0, times >= 1]: its jobs are evicted seconds into a run, "
        "times times",
        _node_evictions,
    )


@dataclass(frozen=True)
class ExecutionTable:
    python: str = key(
        "",
        "an absolute path to a Python with torch on the execute nodes (default: the "
        "planner's, or /usr/bin/python3 in a container_image)",
        _fits_a_submit_line,
    )
    container_image: str = key(
        "",
        'an image for HTCondor\'s container_image ("docker://..." or a .sif path)',
        _fits_a_submit_line,
    )
    env_tarball: str = key(
        "",
        "a .tar.gz of a Python environment with torch (conda-pack or venv)",
        _fits_a_submit_line,
    )
    submit_python: str = key(
        "",
        "an absolute path to a Python with torch on the submit host, for the aggregation and "
        "report jobs (default: the planner's)",
        _fits_a_submit_line,
    )


@dataclass(frozen=True)
class RunConfig:
    """A whole run's config. The TOML table [async] is the field `async_` (a Python keyword)."""

    run: RunTable = field(default_factory=RunTable)
    async_: AsyncTable = field(default_factory=AsyncTable)
    data: DataTable = field(default_factory=DataTable)
    model: ModelTable = field(default_factory=ModelTable)
    train: TrainTable = field(default_factory=TrainTable)
    server: ServerTable = field(default_factory=ServerTable)
    compression: CompressionTable = field(default_factory=CompressionTable)
    resources: ResourcesTable = field(default_factory=ResourcesTable)
    faults: FaultsTable = field(default_factory=FaultsTable)
    execution: ExecutionTable = field(default_factory=ExecutionTable)

    @property
    def is_async(self) -> bool:
        return self.run.mode == "async"

    @property
    def compressed(self) -> bool:
        """Compressed updates (DGC, fp16, int8), and an error-feedback residual per lane (a node,
        in sync mode) on the execute machine."""
        return self.compression.method != "none"

    @property
    def models_from_mirrors(self) -> bool:
        """Node jobs fetch the global model from the mirrors (the embedded ones serve the run's
        models, `[data] publish` uploads them) and get only its pointer by file transfer."""
        return self.data.embedded or bool(self.data.publish)

    @property
    def update_budget(self) -> int:
        """Updates an asynchronous run applies before its lanes stop: by default the synchronous
        run's work (nodes x rounds)."""
        return self.async_.updates or self.run.nodes * self.run.rounds

    @property
    def schedule_length(self) -> int:
        """Steps of the learning-rate schedule: rounds, or the model versions an asynchronous
        run makes (one per `buffer` updates), so both modes decay over the same work."""
        if not self.is_async:
            return self.run.rounds
        return math.ceil(self.update_budget / self.async_.buffer)

    def with_values(self, table: str, **values: Any) -> "RunConfig":
        """A copy with some keys of one table (by its TOML name) changed."""
        name = _field_name(table)
        return replace(self, **{name: replace(getattr(self, name), **values)})


def table_name(table_field: Field) -> str:
    """The TOML name of a RunConfig field."""
    return table_field.name.rstrip("_")


def _field_name(table: str) -> str:
    return next(f.name for f in fields(RunConfig) if table_name(f) == table)


def schema() -> Iterator[tuple[str, Field]]:
    """(table, key field) for every key, in file order: the one list the README table,
    config.toml and validation walk."""
    for table_field in fields(RunConfig):
        for key_field in fields(table_field.default_factory):
            yield table_name(table_field), key_field


def _frozen(value: Any) -> Any:
    """TOML arrays become tuples: the config is immutable all the way down."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def describe(key_field: Field, choices: tuple[str, ...] = ()) -> str:
    """What a key allows, in words; a registry's names are listed from the registry itself."""
    allowed = key_field.metadata["allowed"]
    if choices:
        allowed = f"one of {', '.join(map(json.dumps, choices))}: {allowed}"
    async_default = key_field.metadata["async_default"]
    if async_default is not None:
        allowed += f"; default {toml_value(async_default)} in asynchronous runs"
    return allowed


def _check_value(origin: str, table: str, key_field: Field, value: Any, choices: tuple) -> Any:
    where = f"{origin}: [{table}] {key_field.name} = {value!r}"
    allowed = describe(key_field, choices)
    kind = get_origin(key_field.type) or key_field.type
    if kind is float and type(value) is int:
        value = float(value)
    if isinstance(value, bool) and kind is not bool:
        raise UserError(f"{where} is not allowed; expected {allowed}")
    value = _frozen(value)
    if not isinstance(value, kind):
        raise UserError(f"{where} has the wrong type; expected {allowed}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where} is not a finite number; expected {allowed}")
    if not key_field.metadata["rule"](value) or (choices and value not in choices):
        raise UserError(f"{where} is not allowed; expected {allowed}")
    return value


def parse(
    raw: dict[str, Any],
    origin: str = "<config>",
    choices: dict[str, tuple[str, ...]] | None = None,
) -> RunConfig:
    """Validate a parsed TOML document and fill in every default.

    `choices` maps a registry name (see `key`) to the names it holds; jobs, reading a config
    the planner already validated, pass none.
    """
    tables = {table_name(f): f for f in fields(RunConfig)}
    for table in raw:
        if table not in tables:
            raise UserError(
                f"{origin}: unknown table [{table}]; allowed tables: {', '.join(tables)}"
            )
        if not isinstance(raw[table], dict):
            raise UserError(f"{origin}: {table} must be a table ([{table}])")
    resolved = {}
    for table, table_field in tables.items():
        keys = {f.name: f for f in fields(table_field.default_factory)}
        given = raw.get(table, {})
        for name in given:
            if name not in keys:
                raise UserError(
                    f"{origin}: unknown key [{table}] {name}; allowed keys in [{table}]: "
                    f"{', '.join(keys)}"
                )
        resolved[table_field.name] = table_field.default_factory(
            **{
                name: _check_value(
                    origin,
                    table,
                    keys[name],
                    value,
                    (choices or {}).get(keys[name].metadata["choices"], ()),
                )
                for name, value in given.items()
            }
        )
    config = RunConfig(**resolved)
    return _with_mode_defaults(config, raw) if config.is_async else config


def _with_mode_defaults(config: RunConfig, raw: dict[str, Any]) -> RunConfig:
    """The asynchronous defaults of the keys the user did not set."""
    for table, key_field in schema():
        value = key_field.metadata["async_default"]
        if value is not None and key_field.name not in raw.get(table, {}):
            config = config.with_values(table, **{key_field.name: value})
    return config


def with_relations(config: RunConfig, raw: dict[str, Any], origin: str) -> RunConfig:
    """Rules that involve two keys of a user's config (`raw` is what the user wrote); single-key
    rules live in the tables above. A resolved config, which jobs read, already holds them."""
    train = raw.get("train", {})
    if train.get("local_steps") and train.get("local_epochs"):
        raise UserError(
            f"{origin}: [train] sets both local_steps and local_epochs; set only one of them"
        )
    if config.train.local_epochs:
        config = config.with_values("train", local_steps=0)
    elif not config.train.local_steps:
        raise UserError(f"{origin}: [train] local_steps = 0; set it, or set local_epochs instead")
    data = config.data
    if not data.source and not data.dataset:
        raise UserError(
            f"{origin}: [data] needs source (a folder of class folders of images) or dataset "
            "(a prepared dataset folder)"
        )
    if len(data.publish) > len(data.mirrors):
        raise UserError(
            f"{origin}: [data] publish lists {len(data.publish)} URL(s) for "
            f"{len(data.mirrors)} mirror(s); give an upload URL for each of the first mirrors in "
            "[data] mirrors, in the same order (embedded mirrors serve the models without it)"
        )
    execution = config.execution
    for name in ("python", "submit_python"):
        value = getattr(execution, name)
        if value and not value.startswith("/"):
            raise UserError(f"{origin}: [execution] {name} = {value!r} must be an absolute path")
    if execution.container_image and execution.env_tarball:
        raise UserError(
            f"{origin}: [execution] sets both container_image and env_tarball; a node job finds "
            "Python one way: choose one"
        )
    if execution.env_tarball and execution.python:
        raise UserError(f"{origin}: [execution] env_tarball brings its own Python; remove python")
    return config


def read_run_config(path: Path) -> RunConfig:
    """A job reads the resolved config the planner wrote; a file it cannot read is named."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{path}: cannot read the run config: {exc}") from None
    for table in ("run", "data", "model", "train", "server"):
        if table not in raw:
            raise UserError(f"{path}: the run config has no [{table}] table; plan the run again")
    return parse(raw, str(path))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string once DEL, which TOML also escapes, is escaped.
        return json.dumps(value).replace("\x7f", "\\u007f")
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: RunConfig) -> str:
    """The resolved config as TOML, in schema order so runs diff cleanly."""
    lines = ["# Resolved dagtrain config: every key filled in. Jobs read this file."]
    for table_field in fields(RunConfig):
        values = getattr(config, table_field.name)
        lines += ["", f"[{table_name(table_field)}]"]
        lines += [f"{f.name} = {toml_value(getattr(values, f.name))}" for f in fields(values)]
    return "\n".join(lines) + "\n"
