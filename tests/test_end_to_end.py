"""A tiny run through the whole product: plan, local runner, node jobs, aggregation, report."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from node_payload.common.run_layout import model_path
from node_payload.common.tensor_io import load_tensors
from pipeline.cli import main
from tests.test_tensorboard_log import scalars


def test_bad_config_is_one_message_and_writes_nothing(
    tiny_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["plan", str(tiny_config(run__quorum="1.5")), "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "[run] quorum = 1.5" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_run_of_a_missing_directory_is_explained(tmp_path: Path, capsys) -> None:
    assert main(["run", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_run_trains_resumes_and_reproduces(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = tiny_config()
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["plan", str(config), "--out", str(first)]) == 0
    assert main(["run", str(first), "--slots", "2"]) == 0

    report = json.loads((first / "report.json").read_text())
    assert report["status"] == "completed"
    assert report["rounds_completed"] == 2
    assert 0.0 <= report["final_accuracy"] <= 1.0
    for round_ in report["rounds"]:
        assert round_["nodes_used"] == 3
        assert round_["bytes_downloaded"] > 0
        assert round_["seconds"] > 0
        assert {"accuracy", "loss"} <= round_.keys()
    assert (first / "accuracy.png").stat().st_size > 0
    final = model_path(first, 2).read_bytes()
    board = scalars(first)  # one point per round, at the version it made
    assert {"heldout/accuracy", "heldout/image_accuracy", "heldout/loss"} <= board.keys()
    assert {"updates/nodes_used", "updates/bytes", "time/seconds"} <= board.keys()
    assert board["heldout/accuracy"] == [
        (r["round"] + 1, pytest.approx(r["accuracy"])) for r in report["rounds"]
    ]
    assert board["updates/nodes_used"] == [(1, 3.0), (2, 3.0)]

    # Running a finished run again redoes nothing and loses nothing.
    assert main(["run", str(first)]) == 0
    assert model_path(first, 2).read_bytes() == final
    assert scalars(first) == board

    # The same config planned again trains the same model: runs are reproducible from the seed.
    assert main(["plan", str(config), "--out", str(second)]) == 0
    assert main(["run", str(second), "--slots", "2"]) == 0
    a, _ = load_tensors(model_path(first, 2))
    b, _ = load_tensors(model_path(second, 2))
    assert all((a[name] == b[name]).all() for name in a)


@pytest.mark.slow
def test_below_quorum_stops_and_resume_reruns_only_missing_nodes(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = tiny_config(run__quorum="1.0", run__retries="1", faults__fail="[[0, 2]]")
    run_dir = tmp_path / "run"
    assert main(["plan", str(config), "--out", str(run_dir)]) == 0
    assert main(["run", str(run_dir)]) == 1

    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "failed" and report["rounds_completed"] == 0
    assert "failed 2 times" in (run_dir / "rounds/r000/n002/MISSING").read_text()
    assert "quorum needs 3" in (run_dir / "rounds/r000/aggregate.err").read_text()
    assert (run_dir / "dagtrain.dag.rescue001").is_file()
    finished = (run_dir / "rounds/r000/n000/metrics.json").read_bytes()

    # Fix the cause (here: the injected fault) and resume: only the missing node runs again.
    resolved = run_dir / "config.toml"
    resolved.write_text(resolved.read_text().replace("fail = [[0, 2]]", "fail = []"))
    assert main(["run", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed" and report["rounds_completed"] == 2
    assert report["rounds"][0]["nodes_used"] == 3
    assert (run_dir / "rounds/r000/n000/metrics.json").read_bytes() == finished
