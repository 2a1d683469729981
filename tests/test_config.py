"""The config is validated key by key, before anything is written."""

from pathlib import Path

import pytest

from node_payload.common.errors import UserError
from node_payload.common.run_config import to_toml
from pipeline import config


def _load(tmp_path: Path, text: str) -> config.ConfigFile:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return config.load(path)


def test_defaults_are_filled_in(tmp_path: Path) -> None:
    loaded = _load(tmp_path, '[data]\nsource = "images"\n')
    cfg = loaded.config
    assert cfg.run.nodes == 4
    assert cfg.server.lr == 1.0
    assert cfg.train.local_steps == 40
    assert loaded.path(cfg.data.source) == (tmp_path / "images").resolve()


def test_local_epochs_replace_the_default_steps(tmp_path: Path) -> None:
    cfg = _load(tmp_path, '[data]\nsource = "images"\n[train]\nlocal_epochs = 2.0\n').config
    assert (cfg.train.local_steps, cfg.train.local_epochs) == (0, 2.0)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[run]\nqorum = 0.8", ["[run] qorum", "allowed keys in [run]", "quorum"]),
        ("[runn]\nnodes = 3", ["unknown table [runn]"]),
        ("[run]\nquorum = 1.5", ["[run] quorum = 1.5", "(0, 1]"]),
        ("[run]\nquorum = 0", ["[run] quorum = 0", "(0, 1]"]),
        ("[run]\nnodes = 'four'", ["[run] nodes = 'four'", "wrong type"]),
        ("[run]\nnodes = true", ["[run] nodes = True"]),
        ("[data]\noverlap = 0.95", ["[data] overlap = 0.95", "0 to 0.9"]),
        ("[data]\nmirrors = ['http://x']", ["[data] mirrors", "ftp://"]),
        ("[train]\nlocal_steps = 5\nlocal_epochs = 1.0", ["both local_steps and local_epochs"]),
        ("[resources]\nrequest_memory = 'lots'", ["[resources] request_memory = 'lots'"]),
        ("[execution]\npython = 'python3'", ["absolute path"]),
    ],
)
def test_bad_values_name_key_value_and_rule(tmp_path: Path, text: str, words: list[str]) -> None:
    source = "" if "[data]" in text else '[data]\nsource = "images"\n'
    with pytest.raises(UserError) as error:
        _load(tmp_path, source + text + ("\nsource = 'images'" if "[data]" in text else ""))
    for word in words:
        assert word in str(error.value)
    assert "run.toml" in str(error.value)


def test_missing_data_source_is_explained(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"\[data\] needs source"):
        _load(tmp_path, "[run]\nnodes = 2\n")


def test_not_toml_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not valid TOML"):
        _load(tmp_path, "[run\nnodes = 2")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = _load(tmp_path, '[data]\nsource = "images"\nmirrors = ["ftp://a:1", "ftp://b:2"]\n')
    again = _load(tmp_path, to_toml(cfg.config))
    assert again.config == cfg.config


def test_async_runs_default_to_a_mixing_weight_below_one() -> None:
    from node_payload.common.run_config import parse

    assert parse({"run": {"mode": "async"}}).server.lr == 0.6
    assert parse({"run": {"mode": "async"}, "server": {"lr": 1.0}}).server.lr == 1.0
    assert parse({}).server.lr == 1.0
