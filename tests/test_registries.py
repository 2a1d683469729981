"""The registries of combine rules, server optimizers and staleness functions, and the run
config's allowed values: the same names, so a registered function is a name the config takes."""

from dataclasses import fields

import pytest

from aggregation.choices import REGISTRIES
from node_payload.common.errors import UserError
from node_payload.common.registry import Registry
from node_payload.common.run_config import RunConfig, schema, table_name
from pipeline.config import from_dict, reference_table

CHOOSING = [(table, key) for table, key in schema() if key.metadata["choices"]]


def _config(table: str, name: str, value: str) -> dict:
    return {"data": {"dataset": "d"}, table: {name: value}}


def _table(config: RunConfig, table: str) -> object:
    """A table of the config by its TOML name ([async] is the field async_)."""
    return next(getattr(config, f.name) for f in fields(RunConfig) if table_name(f) == table)


def test_every_registry_is_chosen_by_one_config_key() -> None:
    assert sorted(key.metadata["choices"] for _, key in CHOOSING) == sorted(REGISTRIES)
    for table, key in CHOOSING:
        assert REGISTRIES[key.metadata["choices"]].key == f"[{table}] {key.name}"


@pytest.mark.parametrize(("table", "key"), CHOOSING, ids=lambda v: getattr(v, "name", v))
def test_the_config_accepts_every_registered_name_and_says_so(table: str, key) -> None:
    registry = REGISTRIES[key.metadata["choices"]]
    assert list(registry), "a registry with nothing registered"
    row = next(
        r for r in reference_table().splitlines() if r.startswith(f"| `[{table}] {key.name}`")
    )
    for name in registry:
        config = from_dict(_config(table, key.name, name)).config
        assert getattr(_table(config, table), key.name) == name
        assert f'"{name}"' in row, "the README's config reference leaves it out"
    assert key.default in registry


@pytest.mark.parametrize(("table", "key"), CHOOSING, ids=lambda v: getattr(v, "name", v))
def test_the_config_refuses_a_name_nothing_registered(table: str, key) -> None:
    with pytest.raises(UserError, match=rf"\[{table}\] {key.name} = 'unregistered'"):
        from_dict(_config(table, key.name, "unregistered"))


def test_a_lookup_of_an_unknown_name_says_what_to_choose() -> None:
    registry: Registry = Registry("things", "[server] thing")
    registry.register("a")(len)
    registry.register("b")(abs)
    assert registry["b"] is abs and list(registry) == ["a", "b"]
    with pytest.raises(UserError, match=r"\[server\] thing = 'c' is not known; choose one of a, b"):
        registry["c"]


def test_a_name_cannot_be_registered_twice() -> None:
    registry: Registry = Registry("things", "[server] thing")
    registry.register("a")(len)
    with pytest.raises(ValueError, match="'a' is registered twice"):
        registry.register("a")(abs)
