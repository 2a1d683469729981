"""Hostile published models and pointers: mirrors serving the wrong global model, pointers that
are not pointers, and mirrors asked for what they must not serve.

A node job that gets a model's pointer trains only on the exact bytes the aggregation published:
a mirror serving anything else is named once and passed over (exit 75 when none serves it), a
malformed pointer is refused naming the file and the field (exit 78), and the embedded mirrors
show a run's global models and nothing else of its run directory.
"""

import io
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from ftplib import FTP, error_perm
from pathlib import Path

import pytest

from node_payload import fetch
from node_payload.cli import main as node_main
from node_payload.common.errors import EXIT_FATAL, EXIT_OK, EXIT_RETRYABLE, UserError
from node_payload.common.run_config import RunConfig, read_run_config
from node_payload.common.run_layout import (
    CONFIG_FILE,
    METRICS_FILE,
    MODELS_DIR,
    UPDATE_FILE,
    model_path,
    model_pointer_path,
    published_model_path,
)
from pipeline import config as config_mod
from pipeline.local_run import mirror_ports
from pipeline.mirrors import serve
from pipeline.planner import plan_from_file


@pytest.fixture
def run_dir(tiny_config: Callable[..., Path], tmp_path: Path) -> Path:
    """A planned run whose two embedded mirrors serve its models (nothing serves them yet)."""
    return plan_from_file(tiny_config(data__embedded_mirrors="2"), tmp_path / "run")


def _config(run_dir: Path) -> RunConfig:
    return read_run_config(run_dir / CONFIG_FILE)


def tampered_models(run_dir: Path, dest: Path) -> Path:
    """A copy of the run's models/ whose initial model has one byte changed (its size kept)."""
    models = shutil.copytree(run_dir / MODELS_DIR, dest)
    model = models / model_path(run_dir, 0).name
    data = bytearray(model.read_bytes())
    data[-1] ^= 0x01
    model.write_bytes(bytes(data))
    return models


@contextmanager
def mirrors_of(run_dir: Path, models: list[Path]) -> Iterator[list[str]]:
    """The run's planned mirrors, mirror i serving the models in models[i]."""
    config = _config(run_dir)
    ports = mirror_ports(list(config.data.mirrors))
    with ExitStack() as stack:
        for port, folder in zip(ports, models, strict=True):
            stack.enter_context(
                serve(Path(config.data.dataset), [port], run_models=(config.run.run_id, folder))
            )
        yield list(config.data.mirrors)


def node(run_dir: Path, model: Path, out: Path) -> int:
    args = ["--config", str(run_dir / CONFIG_FILE), "--model", str(model), "--round", "0"]
    return node_main([*args, "--node", "0", "--out", str(out)])


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == fetch.__name__]


def test_a_mirror_serving_another_model_is_passed_over_and_never_trained_on(
    run_dir: Path, tmp_path: Path, caplog
) -> None:
    bad = tampered_models(run_dir, tmp_path / "bad")
    with mirrors_of(run_dir, [bad, run_dir / MODELS_DIR]) as urls:
        assert node(run_dir, model_pointer_path(run_dir, 0), tmp_path / "fetched") == EXIT_OK
        # The same job given the model itself, as file transfer would give it.
        assert node(run_dir, model_path(run_dir, 0), tmp_path / "given") == EXIT_OK
    (line,) = warnings(caplog)
    assert urls[0] in line and "serves a different" in line and "than the run published" in line
    fetched = (tmp_path / "fetched" / UPDATE_FILE).read_bytes()
    assert fetched == (tmp_path / "given" / UPDATE_FILE).read_bytes()
    metrics = json.loads((tmp_path / "fetched" / METRICS_FILE).read_text())
    size = model_path(run_dir, 0).stat().st_size
    assert metrics["bytes"]["from_mirrors"]["model_in"] == 2 * size  # the bad copy, the good one
    assert metrics["mirror_failovers"] == 0  # the data's own fetch went as planned


def test_a_node_exits_75_when_no_mirror_serves_the_published_model(
    run_dir: Path, tmp_path: Path, caplog, capsys, monkeypatch
) -> None:
    bad = tampered_models(run_dir, tmp_path / "bad")
    monkeypatch.setattr(fetch.time, "sleep", lambda _s: None)
    with mirrors_of(run_dir, [bad, bad]):
        assert node(run_dir, model_pointer_path(run_dir, 0), tmp_path / "n0") == EXIT_RETRYABLE
    assert "data unreachable, retry later" in capsys.readouterr().err
    assert len(warnings(caplog)) == 2  # one per mirror: a lie is not asked again
    assert not (tmp_path / "n0").exists()  # no model written, no update


def test_a_mirror_claiming_a_larger_model_is_not_read(
    run_dir: Path, tmp_path: Path, caplog
) -> None:
    """SIZE above the pointer's bytes is a lie: no byte of that copy is read."""
    bigger = shutil.copytree(run_dir / MODELS_DIR, tmp_path / "bigger")
    with (bigger / model_path(run_dir, 0).name).open("ab") as f:
        f.write(b"\0" * 1024)
    with mirrors_of(run_dir, [bigger, run_dir / MODELS_DIR]) as urls:
        assert node(run_dir, model_pointer_path(run_dir, 0), tmp_path / "n0") == EXIT_OK
    (line,) = warnings(caplog)
    size = model_path(run_dir, 0).stat().st_size
    assert urls[0] in line and f"is {size + 1024} bytes, more than {size} allowed" in line
    metrics = json.loads((tmp_path / "n0" / METRICS_FILE).read_text())
    assert metrics["bytes"]["from_mirrors"]["model_in"] == size


def _edit(field: str, value: object) -> Callable[[dict], object]:
    return lambda doc: doc.update({field: value})


def _drop(field: str) -> Callable[[dict], object]:
    return lambda doc: doc.update({}) if doc.pop(field) else None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda doc: "{not json", "not JSON"),
        (lambda doc: [doc], "expected the fields format, run_id, version, path, bytes, sha256"),
        (_edit("mirrors", []), "mirrors [] is not a list of the places of the run's 2 mirrors"),
        (_edit("mirrors", [0, 2]), "mirrors [0, 2] is not a list of the places"),
        (_edit("mirrors", [1, 0]), "(0 to 1, ascending)"),
        (_edit("mirrors", [0, 0]), "mirrors [0, 0] is not"),
        (_edit("mirrors", "0"), "mirrors '0' is not"),
        (
            _drop("sha256"),
            "found ['bytes', 'delta', 'format', 'mirrors', 'path', 'run_id', 'version']",
        ),
        (_edit("format", "dagtrain-model-pointer/9"), "format 'dagtrain-model-pointer/9'"),
        (_edit("run_id", "another-run"), "run_id 'another-run', expected"),
        (_edit("version", "0"), "version '0' is not a version number"),
        (_edit("version", -1), "version -1 is not a version number"),
        (_edit("bytes", 10**15), "bytes 1000000000000000 is not a size from 1 to"),
        (_edit("bytes", True), "bytes True is not a size"),
        (_edit("sha256", "AB" * 32), "is not 64 lowercase hex digits"),
        (_edit("path", "../../etc/passwd"), "path '../../etc/passwd', expected 'published/"),
        (_edit("path", "published/x/global_r000.safetensors"), "path 'published/x/global_r000"),
        (lambda doc: "x" * 5000, "more than 4096 bytes"),
    ],
)
def test_a_malformed_pointer_is_refused_naming_the_file_and_the_field(
    run_dir: Path, tmp_path: Path, capsys, edit: Callable[[dict], object], message: str
) -> None:
    doc = json.loads(model_pointer_path(run_dir, 0).read_text())
    replaced = edit(doc)
    text = replaced if isinstance(replaced, str) else json.dumps(doc)
    if isinstance(replaced, list):
        text = json.dumps(replaced)
    pointer = tmp_path / "global.json"
    pointer.write_text(text)
    assert node(run_dir, pointer, tmp_path / "n0") == EXIT_FATAL
    err = capsys.readouterr().err
    assert f"{pointer}: not a model pointer of this run: " in err and message in err, err
    assert not (tmp_path / "n0" / UPDATE_FILE).exists()


def test_embedded_mirrors_show_the_runs_global_models_and_nothing_else(run_dir: Path) -> None:
    config = _config(run_dir)
    published = published_model_path(config.run.run_id, 0)
    folder = published.rsplit("/", 1)[0]
    with mirrors_of(run_dir, [run_dir / MODELS_DIR] * 2) as urls:
        ftp = FTP()
        ftp.connect("127.0.0.1", mirror_ports(urls)[0])
        ftp.login()
        ftp.voidcmd("TYPE I")
        try:
            assert ftp.size(published) == model_path(run_dir, 0).stat().st_size
            assert ftp.size("manifest.json") > 0  # the dataset, as before
            for hidden in (
                f"{folder}/server_r000.safetensors",  # the server optimizer's state
                f"{folder}/global_r000.json",
                f"{folder}/../config.toml",
                f"{folder}/global_r000.safetensors/../../../config.toml",
                "published/another-run/global_r000.safetensors",
            ):
                with pytest.raises(error_perm, match=r"^550"):
                    ftp.size(hidden)
            with pytest.raises(error_perm, match=r"^55"):
                ftp.storbinary(f"STOR {folder}/global_r001.safetensors", io.BytesIO(b"x"))
            with pytest.raises(error_perm, match=r"^55"):
                ftp.delete(published)
        finally:
            ftp.close()
    assert model_path(run_dir, 0).is_file()


@pytest.mark.parametrize(
    ("publish", "message"),
    [
        (
            '["ftp://writer:secret@127.0.0.1:2121/data"]',
            "is not allowed; expected ftp:// URLs where the first mirrors get the models",
        ),
        (
            '["sftp://writer@127.0.0.1/data"]',
            "[data] publish = ['sftp://writer@127.0.0.1/data'] is not allowed",
        ),
        (
            '["ftp://writer@127.0.0.1:2121/data"]',
            "[data] publish lists 1 URL(s) for 0 mirror(s)",
        ),
    ],
)
def test_a_publish_url_that_would_hand_out_or_lack_its_place_is_refused(
    tiny_config: Callable[..., Path], publish: str, message: str
) -> None:
    with pytest.raises(UserError) as err:
        config_mod.load(tiny_config(data__publish=publish))
    assert message in str(err.value)
