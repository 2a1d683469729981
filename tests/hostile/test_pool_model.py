"""Hostile pool models: a file handed to `dagtrain simulate --pool` with impossible values is
refused before anything is simulated, with one message naming the file, the table and the key."""

from pathlib import Path

import pytest

from node_payload.common.errors import UserError
from pipeline.simulate import pool_model


def _load(tmp_path: Path, text: str) -> pool_model.PoolModel:
    path = tmp_path / "pool.toml"
    path.write_text(text)
    return pool_model.load(path)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[transfer]\nsubmit_host_mb_s = -5", "[transfer] submit_host_mb_s = -5.0"),
        ("[transfer]\nmirrors_mb_s = 0", "[transfer] mirrors_mb_s = 0.0"),
        ("[availability]\nshare_at_start = 1.5", "[availability] share_at_start = 1.5"),
        ("[availability]\non_scale_s = -1", "[availability] on_scale_s = -1.0"),
        ('[availability]\noff = "always"', "[availability] off = 'always'"),
        ("[availability]\non_shape = nan", "[availability] on_shape = nan"),
        ("[machines]\ncount = 0", "[machines] count = 0"),
        ("[machines]\ncount = 2.5", "[machines] count = 2.5"),
        ("[machines]\ncount = true", "[machines] count = True"),
        ("[machines]\nslow = [[0, 0.5]]", "[machines] slow = [[0, 0.5]]"),
        ("[jobs]\nstep_s = -0.1", "[jobs] step_s = -0.1"),
        ('[jobs]\nstartup_s = "fast"', "[jobs] startup_s = 'fast'"),
        ("[negotiation]\ninterval_s = -60", "[negotiation] interval_s = -60.0"),
    ],
)
def test_an_impossible_value_is_refused_naming_the_key(
    tmp_path: Path, text: str, named: str
) -> None:
    with pytest.raises(UserError) as caught:
        _load(tmp_path, text)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'pool.toml'}: {named}: must be ")


def test_an_unknown_key_or_table_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"\[jobs\] step_ms: unknown key; known keys: startup_s"):
        _load(tmp_path, "[jobs]\nstep_ms = 3")
    with pytest.raises(UserError, match=r"\[pool\]: unknown table; known tables: machines"):
        _load(tmp_path, "[pool]\ncount = 3")
    with pytest.raises(UserError, match=r"\[machines\] must be a table"):
        _load(tmp_path, "machines = 3")


def test_a_file_that_is_no_toml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a valid TOML file"):
        _load(tmp_path, "[machines\ncount = 3")


def test_the_shipped_model_is_valid_and_machines_can_be_set() -> None:
    pool = pool_model.load(None)
    assert pool.with_machines(50).machines.count == 50
    with pytest.raises(UserError, match="--machines -3: must be an integer"):
        pool.with_machines(-3)
