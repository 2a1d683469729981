"""The planner writes a run directory that HTCondor accepts and that never overwrites a run."""

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import htcondor2
import pytest

from node_payload.common.errors import EXIT_FATAL, UserError
from node_payload.common.model_file import load_model
from pipeline import config as config_mod
from pipeline.dag.writer import dag_var
from pipeline.local_runner.dag_file import parse_dag
from pipeline.planner import make_plan, plan_from_file, write

DAG_KEYWORDS = {"job", "parent", "child", "retry", "script", "vars", "final", "category"}


@pytest.fixture
def run_dir(tiny_config: Callable[..., Path], tmp_path: Path) -> Path:
    return plan_from_file(tiny_config(), tmp_path / "run")


def test_run_directory_layout(run_dir: Path) -> None:
    for relative in (
        "dagtrain.dag",
        "config.toml",
        "submit/node.sub",
        "submit/aggregate.sub",
        "submit/report.sub",
        "scripts/node_post.sh",
        "payload/dagtrain.pyz",
        "models/global_r000.safetensors",
        "models/server_r000.safetensors",
        "data/heldout.json",
        "rounds/r000/n002",
    ):
        assert (run_dir / relative).exists(), relative
    # Round 0's folders only: each round's aggregation makes the next round's.
    assert not (run_dir / "rounds/r001").exists()
    _model, metadata = load_model(run_dir / "models/global_r000.safetensors")
    assert metadata["version"] == "0" and metadata["num_classes"] == "4"


def test_every_submit_file_parses_with_htcondor(run_dir: Path) -> None:
    for sub in (run_dir / "submit").glob("*.sub"):
        submit = htcondor2.Submit(sub.read_text())
        assert submit["executable"], sub
    node = htcondor2.Submit((run_dir / "submit/node.sub").read_text())
    assert node["should_transfer_files"] == "YES"
    # Embedded mirrors serve the run's models: a job gets the model's pointer, not the model.
    assert "models/global_$(rtag).json" in node["transfer_input_files"]
    assert "dagtrain.pyz" in node["transfer_input_files"]
    assert node["transfer_output_files"] == "update.safetensors, metrics.json"
    assert node["request_cpus"] == "1"
    assert "request_gpus" not in node
    assert {"log", "output", "error"} <= set(node.keys())


def test_gpus_are_requested_only_when_asked(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    run = plan_from_file(tiny_config(resources__request_gpus="1"), tmp_path / "gpu")
    node = htcondor2.Submit((run / "submit/node.sub").read_text())
    assert node["request_gpus"] == "1"


def test_dag_structure(run_dir: Path) -> None:
    dag = parse_dag(run_dir / "dagtrain.dag")
    assert list(dag.nodes) == [
        "train_r000_n000", "train_r000_n001", "train_r000_n002", "aggregate_r000",
        "train_r001_n000", "train_r001_n001", "train_r001_n002", "aggregate_r001", "report",
    ]  # fmt: skip
    assert not {n.lower() for n in dag.nodes} & DAG_KEYWORDS
    for node in dag.nodes.values():
        assert node.submit_file.is_file()
    assert dag.final == "report" and dag.nodes["report"].submit == "submit/report.sub"
    assert dag.nodes["aggregate_r000"].parents == {f"train_r000_n00{n}" for n in range(3)}
    assert dag.nodes["aggregate_r000"].children == {f"train_r001_n00{n}" for n in range(3)}
    node = dag.nodes["train_r001_n002"]
    assert (node.retries, node.unless_exit) == (2, EXIT_FATAL)
    assert dag.status_file == "dagtrain.dag.status" and dag.status_min_update > 0
    post = dag.nodes["train_r000_n001"].post
    assert post and [post.executable, *post.args[:3]] == [
        "scripts/node_post.sh", "$RETURN", "$RETRY", "$MAX_RETRIES",
    ]  # fmt: skip
    # a job's seed follows from the run's seed, its round and node: the DAG does not repeat it
    jobs = {(n.vars["round"], n.vars["node"]) for n in dag.nodes.values() if "node" in n.vars}
    assert len(jobs) == 6 and not any("seed" in n.vars for n in dag.nodes.values())


def test_vars_values_are_escaped() -> None:
    assert dag_var('say "hi" \\o/') == 'say \\"hi\\" \\\\o/'


def test_existing_run_is_never_overwritten(run_dir: Path, tiny_config: Callable[..., Path]) -> None:
    before = (run_dir / "models/global_r000.safetensors").read_bytes()
    with pytest.raises(UserError, match="never overwritten"):
        plan_from_file(tiny_config(run__seed="99"), run_dir)
    assert (run_dir / "models/global_r000.safetensors").read_bytes() == before


def test_failed_plan_writes_nothing(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"local_train|fragments|class"):
        plan_from_file(tiny_config(data__local_train="100000"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_python_api_plan_and_write(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    plan = make_plan(config_mod.load(tiny_config(run__nodes="5")))
    assert plan.nodes == 5 and plan.rounds == 2
    assert plan.seed(1, 4) != plan.seed(0, 4)
    out = write(plan, tmp_path / "api-run")
    assert (out / "rounds/r000/n004").is_dir()


def test_embedded_mirrors_are_resolved(run_dir: Path) -> None:
    resolved = config_mod.load(run_dir / "config.toml").config
    assert resolved.data.embedded is True
    assert len(resolved.data.mirrors) == 2
    assert all(url.startswith("ftp://127.0.0.1:") for url in resolved.data.mirrors)
    assert len(resolved.data.manifest_sha256) == 64


def test_interpreter_path_on_the_nodes(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    run = plan_from_file(tiny_config(execution__python='"/opt/py/bin/python3"'), tmp_path / "r")
    node = htcondor2.Submit((run / "submit/node.sub").read_text())
    assert node["executable"] == "/opt/py/bin/python3"
    assert node["transfer_executable"] == "false"
    assert "container_image" not in node


def test_container_image(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    run = plan_from_file(
        tiny_config(execution__container_image='"docker://example.org/torch:2"'), tmp_path / "r"
    )
    node = htcondor2.Submit((run / "submit/node.sub").read_text())
    assert node["container_image"] == "docker://example.org/torch:2"
    assert node["executable"] == "/usr/bin/python3"
    aggregate = htcondor2.Submit((run / "submit/aggregate.sub").read_text())
    assert "container_image" not in aggregate


def test_environment_tarball_is_unpacked_by_the_wrapper(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    # A stand-in environment whose bin/python only reports how it was called.
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin/python").write_text('#!/bin/sh\necho "python $*"\n')
    (env / "bin/python").chmod(0o755)
    tarball = tmp_path / "torch-env.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(env), "."], check=True)

    run = plan_from_file(tiny_config(execution__env_tarball=f'"{tarball}"'), tmp_path / "r")
    node = htcondor2.Submit((run / "submit/node.sub").read_text())
    assert node["executable"] == "../../../scripts/run_in_env.sh"
    assert str(tarball) in node["transfer_input_files"]
    assert node["arguments"].startswith('"torch-env.tar.gz dagtrain.pyz node')

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    shutil.copy(tarball, scratch)
    out = subprocess.run(
        [str(run / "scripts/run_in_env.sh"), "torch-env.tar.gz", "dagtrain.pyz", "node"],
        cwd=scratch, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "python dagtrain.pyz node"


def test_missing_environment_tarball_is_named(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    with pytest.raises(UserError, match=r"env_tarball.*no such file"):
        plan_from_file(tiny_config(execution__env_tarball='"nope.tar.gz"'), tmp_path / "r")


def test_node_job_throttle_is_a_maxjobs_command(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    run = plan_from_file(tiny_config(run__max_node_jobs="5"), tmp_path / "r")
    dag = (run / "dagtrain.dag").read_text()
    assert re.search(r"^MAXJOBS train 5$", dag, re.M)
    assert re.search(r"^CATEGORY ALL_NODES train$", dag, re.M)
    assert re.search(r"^CATEGORY aggregate_r000 aggregate$", dag, re.M)
    assert not re.search(r"^CATEGORY train \d+$", dag, re.M), "CATEGORY written where MAXJOBS meant"


def test_config_with_mirror_passwords_is_private(
    tiny_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pipeline.planner.check_mirrors", lambda *_args, **_kw: None)
    url = '["ftp://reader:s3cret@127.0.0.1:2121/data"]'
    secret = plan_from_file(tiny_config(data__mirrors=url), tmp_path / "secret")
    assert (secret / "config.toml").stat().st_mode & 0o777 == 0o600
    plain = plan_from_file(tiny_config(), tmp_path / "plain")
    assert (plain / "config.toml").stat().st_mode & 0o077 != 0


def test_an_unwritable_out_is_one_message(tiny_config: Callable[..., Path], tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: use a path under a file instead
        locked = tmp_path / "a-file"
        locked.write_text("")
    with pytest.raises(UserError, match=r"cannot create the run directory there .*--out"):
        plan_from_file(tiny_config(), locked / "run")


def test_bad_images_can_be_skipped_when_planning(
    tiny_source: Path, tmp_path: Path, tiny_config: Callable[..., Path]
) -> None:
    source = tmp_path / "images"
    shutil.copytree(tiny_source, source)
    junk = next(source.iterdir()) / "junk.png"
    junk.write_bytes(b"not an image")
    text = tiny_config().read_text().replace("[data]\n", f'[data]\nsource = "{source}"\n', 1)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("dataset ="))
    path = tmp_path / "skip.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=r"junk\.png.*skip_bad_images = true"):
        plan_from_file(path, tmp_path / "refused")
    path.write_text(text.replace("[data]\n", "[data]\nskip_bad_images = true\n", 1))
    run_dir = plan_from_file(path, tmp_path / "run")
    sources = config_mod.load(run_dir / "config.toml").config.data.dataset
    assert "junk.png" not in (Path(sources) / "manifest.json").read_text()


def test_a_local_set_smaller_than_a_batch_is_refused(
    tiny_config: Callable[..., Path], tmp_path: Path
) -> None:
    """40 fragments with batches of 64: every step would be the same 40 fragments."""
    config = tiny_config(data__local_train="40", train__batch_size="64")
    with pytest.raises(UserError) as error:
        plan_from_file(config, tmp_path / "run")
    message = str(error.value)
    assert "[data] local_train = 40" in message and "[train] batch_size = 64" in message
    assert str(config) in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("local_train", "batch", "left"), [(40, 16, 8), (33, 32, 1)])
def test_a_partial_last_batch_is_a_warning(
    tiny_config: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    local_train: int,
    batch: int,
    left: int,
) -> None:
    config = tiny_config(data__local_train=str(local_train), train__batch_size=str(batch))
    run = plan_from_file(config, tmp_path / "run")
    err = capsys.readouterr().err
    assert f"[data] local_train = {local_train} is not a multiple of [train] batch_size" in err
    assert f"last {left} fragments untrained" in err
    assert f"set local_train to {local_train - left} or {local_train - left + batch}" in err
    assert (run / "dagtrain.dag").is_file()


def test_whole_batches_plan_without_a_batch_warning(
    tiny_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan_from_file(tiny_config(data__local_train="32", train__batch_size="32"), tmp_path / "run")
    assert "batch_size" not in capsys.readouterr().err


def test_too_few_source_images_for_the_target_diversity_is_said_and_planned(
    tiny_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny dataset keeps 3 of 4 images per class for training: local sets span 2."""
    run = plan_from_file(tiny_config(), tmp_path / "run")
    err = " ".join(capsys.readouterr().err.split())
    assert "spans up to 16 source images per class, but 4 of 4 classes have fewer" in err
    assert "2 in '" in err and "and 1 more; local sets use what there is" in err
    assert "lower holdout (now 0.25)" in err
    assert (run / "dagtrain.dag").is_file()
