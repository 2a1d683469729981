"""Hostile config values: every name that reaches a DAG, submit file or path, and every number.

A config can come from anyone who can hand a user a TOML file: each case must be refused before
anything is written, with a message naming the file, the key and what is allowed.
"""

import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from node_payload.common.errors import UserError
from node_payload.common.run_config import to_toml
from pipeline import config
from pipeline.planner import plan_from_file


def _load(tmp_path: Path, text: str) -> config.ConfigFile:
    path = tmp_path / "run.toml"
    path.write_text('[data]\nsource = "images"\n' + text)
    return config.load(path)


@pytest.mark.parametrize(
    "name",
    [
        "x\\n\\tSCRIPT PRE n000 /bin/sh -c evil\\n",
        "a b",
        "../../etc",
        "..",
        "run/sub",
        'q\\"uote',
        "é",
        "x" * 65,
        "",
    ],
)
def test_run_names_outside_the_safe_alphabet_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError, match=r"run\.toml: \[run\] name = .* A-Z a-z 0-9 \. _ -"):
        _load(tmp_path, f'[run]\nname = "{name}"\n')


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("train", "lr", "inf"),
        ("train", "local_epochs", "inf"),
        ("train", "weight_decay", "inf"),
        ("train", "lr", "nan"),
        ("server", "lr", "+inf"),
        ("server", "max_update_norm", "inf"),
        ("async", "staleness_a", "inf"),
        ("run", "quorum", "nan"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key(
    tmp_path: Path, table: str, key: str, value: str
) -> None:
    with pytest.raises(UserError, match=rf"\[{table}\] {key} = .* is not a finite number"):
        _load(tmp_path, f"[{table}]\n{key} = {value}\n")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("python", '"/usr/bin/python3\\nexecutable = /bin/evil"'),
        ("submit_python", '"/usr/bin/py\\"thon"'),
        ("container_image", '"docker://x\\nqueue 1000"'),
        ("env_tarball", '"env\'.tar.gz"'),
    ],
)
def test_paths_written_into_submit_files_cannot_carry_a_new_line(
    tmp_path: Path, key: str, value: str
) -> None:
    with pytest.raises(UserError, match=rf"\[execution\] {key} = .* is not allowed"):
        _load(tmp_path, f"[execution]\n{key} = {value}\n")


def test_node_cache_cannot_carry_a_new_line() -> None:
    with pytest.raises(UserError, match=r"\[data\] node_cache = .* is not allowed"):
        config.from_dict({"data": {"source": "images", "node_cache": "/scratch\n+Owner = 1"}})


def test_arch_is_a_plain_name(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"\[model\] arch = '\.\./x' is not allowed"):
        _load(tmp_path, '[model]\narch = "../x"\n')


def test_credentials_with_quotes_and_control_characters_survive_the_resolved_config() -> None:
    mirror = 'ftp://user:p"a\\ss\x7fw\tord@127.0.0.1:2121/data'
    cfg = config.from_dict({"data": {"source": "images", "mirrors": [mirror]}})
    again = config.from_dict(tomllib.loads(to_toml(cfg.config)))
    assert again.config.data.mirrors == (mirror,)


def test_an_injecting_name_writes_no_run_directory(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    path = tiny_config(run__name='"x\\nSCRIPT PRE n000 evil"')
    with pytest.raises(UserError, match=r"\[run\] name"):
        plan_from_file(path, tmp_path / "run")
    assert not (tmp_path / "run").exists()
