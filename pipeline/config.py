"""A user's config file: read it, validate it against the schema, and know where it came from.

The schema (every key's type, default and rule) is `node_payload.common.run_config`, which jobs
read too. Here the planner supplies what only it can: the registries that list the allowed
combine rules, server optimizers and staleness functions, and the file's folder, against which
relative paths resolve.
"""

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregation.choices import REGISTRIES
from node_payload.common.errors import UserError
from node_payload.common.run_config import (
    RunConfig,
    describe,
    parse,
    schema,
    toml_value,
    with_relations,
)


@dataclass(frozen=True)
class ConfigFile:
    """A validated config and its origin: messages name the file, paths resolve against it."""

    config: RunConfig
    origin: str = "<config>"
    base_dir: Path = field(default_factory=Path.cwd)

    def path(self, value: str) -> Path:
        """A path key's value, a relative one taken from the config file's folder."""
        return (self.base_dir / value).resolve()


def from_dict(
    raw: dict[str, Any], origin: str = "<config>", base_dir: Path | None = None
) -> ConfigFile:
    """Validate a parsed TOML document and fill in every default."""
    config = with_relations(parse(raw, origin, _choices()), raw, origin)
    return ConfigFile(config, origin, (base_dir or Path.cwd()).resolve())


def _choices() -> dict[str, tuple[str, ...]]:
    return {name: tuple(registry) for name, registry in REGISTRIES.items()}


def load(path: Path, overrides: Sequence[str] = ()) -> ConfigFile:
    """Read and validate a TOML config file, with `overrides` (TABLE.KEY=VALUE) set over it."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    for setting in overrides:
        override(raw, setting)
    return from_dict(raw, str(path), path.parent)


def override(raw: dict[str, Any], setting: str) -> None:
    """Set one TABLE.KEY=VALUE (`dagtrain plan --set`) in a parsed document, so a run differs
    from its file without an edited copy. VALUE is read as TOML (0.1, true, "cosine", [1, 2]), a
    bare word as a string. The key and its value are checked alone first, so a mistake is named
    as the setting, not as the file; rules between keys are checked with the whole document."""
    name, equals, text = setting.partition("=")
    table, dot, key = name.strip().partition(".")
    where = f"--set {setting}"
    if not (equals and dot and table and key and text.strip()):
        raise UserError(f"{where}: expected TABLE.KEY=VALUE, e.g. --set train.lr=0.1")
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    parse({table: {key: value}}, where, _choices())
    given = raw.setdefault(table, {})
    if not isinstance(given, dict):
        raise UserError(f"{where}: {table} is not a table in the config file")
    given[key] = value


def reference_table() -> str:
    """Markdown table of every key, generated so the README and the code cannot drift."""
    rows = ["| key | default | allowed |", "|---|---|---|"]
    choices = _choices()
    for table, key in schema():
        allowed = describe(key, choices.get(key.metadata["choices"], ()))
        rows.append(f"| `[{table}] {key.name}` | `{toml_value(key.default)}` | {allowed} |")
    return "\n".join(rows)
