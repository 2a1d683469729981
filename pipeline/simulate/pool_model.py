"""The pool model: a TOML file of machines, availability, negotiation, transfers and job costs.

Every key has a default (the shipped `default_pool.toml` repeats them with comments) and a rule;
a file with an unknown table or key, or a value that breaks its rule (a negative rate, a share
above 1), is refused with one message naming the file, the table and the key.
"""

import math
import tomllib
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from node_payload.common.errors import UserError

LAWS = ("always", "weibull", "lognormal")
OFF_LAWS = ("weibull", "lognormal")


def _spec(default: Any, allowed: str, rule: Callable[[Any], bool]) -> Any:
    return field(default=default, metadata={"allowed": allowed, "rule": rule})


def _number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return _number(v) and v > 0


def _non_negative(v: Any) -> bool:
    return _number(v) and v >= 0


def _count(v: Any) -> bool:
    return type(v) is int and 1 <= v <= 1_000_000


def _slow_pairs(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(p, list)
        and len(p) == 2
        and type(p[0]) is int
        and p[0] >= 0
        and _number(p[1])
        and p[1] >= 1
        for p in v
    )


@dataclass(frozen=True)
class Machines:
    count: int = _spec(500, "an integer from 1 to 1000000", _count)
    speed: str = _spec(
        "lognormal", '"constant" or "lognormal"', lambda v: v in ("constant", "lognormal")
    )
    speed_median: float = _spec(1.0, "a positive number", _positive)
    speed_sigma: float = _spec(0.4, "a non-negative number", _non_negative)
    slow: tuple[tuple[int, float], ...] = _spec(
        (), "a list of [machine, factor >= 1]: those machines factor times as slow", _slow_pairs
    )
    order: str = _spec("random", '"random" or "listed"', lambda v: v in ("random", "listed"))


@dataclass(frozen=True)
class Availability:
    on: str = _spec("weibull", '"always", "weibull" or "lognormal"', lambda v: v in LAWS)
    on_shape: float = _spec(0.6, "a positive number", _positive)
    on_scale_s: float = _spec(14400.0, "a positive number of seconds", _positive)
    off: str = _spec("lognormal", '"weibull" or "lognormal"', lambda v: v in OFF_LAWS)
    off_shape: float = _spec(1.5, "a positive number", _positive)
    off_scale_s: float = _spec(3600.0, "a positive number of seconds", _positive)
    share_at_start: float = _spec(
        0.66, "a share of the machines from 0 to 1", lambda v: _number(v) and 0 <= v <= 1
    )


@dataclass(frozen=True)
class Negotiation:
    interval_s: float = _spec(60.0, "a non-negative number of seconds", _non_negative)
    claim_reuse_s: float = _spec(2.0, "a non-negative number of seconds", _non_negative)
    periodic_s: float = _spec(60.0, "a non-negative number of seconds", _non_negative)
    submits_per_interval: int = _spec(100, "an integer from 1 to 1000000", _count)
    submit_interval_s: float = _spec(5.0, "a non-negative number of seconds", _non_negative)


@dataclass(frozen=True)
class Transfer:
    submit_host_mb_s: float = _spec(100.0, "a positive number of MB/s", _positive)
    mirrors_mb_s: float = _spec(200.0, "a positive number of MB/s", _positive)
    machine_mb_s: float = _spec(10.0, "a positive number of MB/s", _positive)


@dataclass(frozen=True)
class Jobs:
    startup_s: float = _spec(30.0, "a non-negative number of seconds", _non_negative)
    first_startup_s: float = _spec(60.0, "a non-negative number of seconds", _non_negative)
    step_s: float = _spec(0.25, "a positive number of seconds", _positive)
    script_s: float = _spec(0.2, "a non-negative number of seconds", _non_negative)
    arrive_s: float = _spec(5.0, "a non-negative number of seconds", _non_negative)
    apply_s: float = _spec(2.0, "a non-negative number of seconds", _non_negative)
    aggregate_s: float = _spec(10.0, "a non-negative number of seconds", _non_negative)
    merge_mb_s: float = _spec(1000.0, "a positive number of MB/s", _positive)
    report_s: float = _spec(20.0, "a non-negative number of seconds", _non_negative)


@dataclass(frozen=True)
class PoolModel:
    machines: Machines = Machines()
    availability: Availability = Availability()
    negotiation: Negotiation = Negotiation()
    transfer: Transfer = Transfer()
    jobs: Jobs = Jobs()

    def with_machines(self, count: int) -> "PoolModel":
        if not _count(count):
            raise UserError(f"--machines {count}: must be an integer from 1 to 1000000")
        return replace(self, machines=replace(self.machines, count=count))


def _table(origin: str, name: str, kind: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{origin}: [{name}] must be a table of keys")
    known = {f.name: f for f in fields(kind)}
    for key_name, value in raw.items():
        spec: Field | None = known.get(key_name)
        if spec is None:
            raise UserError(
                f"{origin}: [{name}] {key_name}: unknown key; known keys: {', '.join(known)}"
            )
        if type(spec.default) is float and type(value) is int:
            value = float(value)
        if type(value) is bool or not spec.metadata["rule"](value):
            raise UserError(
                f"{origin}: [{name}] {key_name} = {value!r}: must be {spec.metadata['allowed']}"
            )
    values = {k: tuple(map(tuple, v)) if isinstance(v, list) else v for k, v in raw.items()}
    return kind(**values)


def from_dict(raw: dict[str, Any], origin: str) -> PoolModel:
    """A validated pool model from a parsed TOML document."""
    known = {f.name: f.type for f in fields(PoolModel)}
    tables = {}
    for name, value in raw.items():
        if name not in known:
            raise UserError(f"{origin}: [{name}]: unknown table; known tables: {', '.join(known)}")
        tables[name] = _table(origin, name, type(getattr(PoolModel(), name)), value)
    return PoolModel(**tables)


def load(path: Path | None) -> PoolModel:
    """The pool model in `path`, or the default one shipped with dagtrain."""
    if path is None:
        text = resources.files(__package__).joinpath("default_pool.toml").read_text()
        return from_dict(tomllib.loads(text), "default_pool.toml")
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read the pool model ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not a valid TOML file ({exc})") from None
    return from_dict(raw, str(path))
