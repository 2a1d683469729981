"""The command line as a user meets it: version, help with defaults and exit codes, config
overrides at plan time, machine-readable status, and progress lines where no terminal is."""

import argparse
import json
import tomllib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest

from node_payload.common.run_layout import CONFIG_FILE, DAG_FILE
from pipeline import cli
from pipeline.local_runner import run_dag
from tests.test_run_lifecycle import make_run
from tests.test_submit_status import fake_run


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    root = cli.parser()
    [commands] = [a for a in root._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices


def test_version_is_the_installed_package_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"dagtrain {metadata.version('dagtrain')}\n"


def test_every_positional_is_explained_and_every_option_says_its_default() -> None:
    """Flags (no value) and required options have no default to state."""
    for name, command in _subcommands().items():
        formatter = command.formatter_class(name)
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            shown = formatter._get_help_string(action) or ""
            if not action.option_strings:
                assert shown, f"dagtrain {name} {action.dest}: no help"
            elif not action.required and action.nargs != 0:
                assert "default" in shown, f"dagtrain {name} {action.option_strings}: {shown}"


def test_help_lists_the_exit_codes_and_serve_says_it_is_loopback_only(
    capsys: pytest.CaptureFixture,
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    codes = out.split("exit codes:")[1]
    assert [line.split()[0] for line in codes.splitlines() if line[2:3].isdigit()] == [
        "0",
        "1",
        "2",
        "130",
    ]
    assert "143: by SIGTERM or dagtrain rm" in codes
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "loopback-only, anonymous and read-only" in out and "not for a real pool" in out


def test_plan_set_overrides_keys_in_the_written_config(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    settings = ["train.lr=0.125", "server.rule=median", 'train.lr_schedule="cosine"']
    argv = ["plan", str(tiny_config()), "--out", str(run_dir)]
    assert cli.main([*argv, *(arg for s in settings for arg in ("--set", s))]) == 0
    resolved = tomllib.loads((run_dir / CONFIG_FILE).read_text())
    assert resolved["train"]["lr"] == 0.125 and resolved["train"]["lr_schedule"] == "cosine"
    assert resolved["server"]["rule"] == "median"
    assert resolved["run"]["nodes"] == 3  # the file's own keys stay


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.lrr=0.1", "--set train.lrr=0.1: unknown key [train] lrr; allowed keys"),
        ("trian.lr=0.1", "--set trian.lr=0.1: unknown table [trian]"),
        ("run.quorum=1.5", "--set run.quorum=1.5: [run] quorum = 1.5 is not allowed"),
        ("train.lr=fast", "--set train.lr=fast: [train] lr = 'fast' has the wrong type"),
        ("train.lr", "--set train.lr: expected TABLE.KEY=VALUE"),
    ],
)
def test_a_bad_override_is_one_message_naming_it_and_writes_nothing(
    tiny_config: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    setting: str,
    message: str,
) -> None:
    run_dir = tmp_path / "run"
    assert cli.main(["plan", str(tiny_config()), "--out", str(run_dir), "--set", setting]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("error:") == 1 and message in err and "Traceback" not in err
    assert not run_dir.exists()


def test_status_json_holds_the_facts_of_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = fake_run(tmp_path / "run", script='test "$1" -ge 1 || test "$2" != n001')
    assert run_dag(run / DAG_FILE, slots=2).ok
    assert cli.main(["status", str(run), "--json"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    status = json.loads(line)
    assert status["state"] == "done" and status["mode"] == "sync" and status["ended"]
    assert status["accuracy"] == [0.5, 0.6] and status["retries"] == 2
    assert status["report"] == "completed" and status["rounds"] == 2
    assert [r["round"] for r in status["rows"]] == [0, 1]
    assert status["rows"][1] | {"accuracy": 0.6} == {
        "round": 1,
        "waiting": 0,
        "idle": 0,
        "running": 0,
        "held": 0,
        "done": 3,
        "failed": 0,
        "missing": 0,
        "retries": 1,
        "aggregate": "done",
        "accuracy": 0.6,
        "image_accuracy": None,
        "bytes_per_job": None,
        "submit_host_bytes": None,
        "residual_misses": None,
        "model_delta_misses": None,
    }


def test_status_shows_the_bytes_a_round_moved(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = fake_run(tmp_path / "run")
    assert run_dag(run / DAG_FILE, slots=2).ok
    for r, misses in ((0, 0), (1, 2)):
        figures = {"bytes_per_job": 691_234, "submit_host_bytes": 2_500_000 + r * 1_000_000}
        scores = {"accuracy": 0.5, **figures, "residual_misses": misses}
        scores["model_delta_misses"] = 3 * r
        (run / f"rounds/r00{r}/round.json").write_text(json.dumps(scores))
    assert cli.main(["status", str(run), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [
        (r["bytes_per_job"], r["submit_host_bytes"], r["residual_misses"], r["model_delta_misses"])
        for r in rows
    ] == [(691_234, 2_500_000, 0, 0), (691_234, 3_500_000, 2, 3)]
    assert cli.main(["status", str(run)]) == 0
    shown = capsys.readouterr().out
    assert (
        "691 kB per job, submit host 3.00 MB/round, 2 residual misses, 3 model delta misses"
        in " ".join(shown.split())
    )


def test_progress_without_a_terminal_is_a_line_per_round(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = make_run(tmp_path / "run", rounds=2)
    assert cli.main(["run", str(run_dir)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if line.startswith("round ")] == [
        "round 1/2 done, held-out accuracy 0.500, 0 retries",
        "round 2/2 done, held-out accuracy 0.600, 0 retries",
    ]
    assert not any("┃" in line or "━" in line for line in lines)  # no table frames
