"""Publishing global models to the mirrors: what a run's node jobs get (the model's pointer or the
model), where the model goes (embedded mirrors serve the run's folder, `[data] publish` uploads
it), and that a node trains on the same bytes either way."""

import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler

from aggregation.publish import publish_model, upload_files
from node_payload.common.errors import UserError
from node_payload.common.model_pointer import read_pointer
from node_payload.common.run_config import RunConfig, read_run_config
from node_payload.common.run_layout import (
    CONFIG_FILE,
    METRICS_FILE,
    NODE_SUBMIT,
    PAYLOAD_NAME,
    UPDATE_FILE,
    model_path,
    model_pointer_path,
    published_model_path,
)
from node_payload.model_fetch import model_file
from pipeline.local_run import run_local
from pipeline.mirrors import MirrorServer, serve
from pipeline.planner import plan_from_file

USER, PASSWORD = "publisher", "s3cret"


def writable(root: Path, user: str = USER) -> MirrorServer:
    """An FTP server writing into root, for `user` (with PASSWORD), or anonymous when empty."""
    authorizer = DummyAuthorizer()
    if user:
        authorizer.add_user(user, PASSWORD, str(root), perm="elradfmw")
    else:
        with warnings.catch_warnings():  # anonymous writes: on loopback, for the test only
            warnings.simplefilter("ignore", RuntimeWarning)
            authorizer.add_anonymous(str(root), perm="elradfmw")
    return MirrorServer(type("Writable", (FTPHandler,), {"authorizer": authorizer}))


@pytest.fixture
def mirror_roots(tiny_dataset: Path, tmp_path: Path) -> Iterator[list[Path]]:
    """Two copies of the dataset, each the root of a read-only mirror."""
    yield [shutil.copytree(tiny_dataset, tmp_path / f"mirror{i}") for i in range(2)]


@pytest.fixture
def netrc_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    (home / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    return home


def _toml_list(urls: list[str]) -> str:
    return json.dumps(urls)


def _config(run_dir: Path) -> RunConfig:
    return read_run_config(run_dir / CONFIG_FILE)


def test_plan_publishes_the_initial_model_to_every_mirror_then_writes_its_pointer(
    tiny_config: Callable[..., Path], mirror_roots: list[Path], tmp_path: Path, netrc_home: Path
) -> None:
    with ExitStack() as stack:
        readers = [stack.enter_context(serve(root, k=1)).urls[0] for root in mirror_roots]
        writers = [writable(root) for root in mirror_roots]
        stack.callback(lambda: [w.close() for w in writers])
        publish = [f"ftp://{USER}@127.0.0.1:{w.port}" for w in writers]
        config_path = tiny_config(
            data__mirrors=_toml_list(readers), data__publish=_toml_list(publish)
        )
        run_dir = plan_from_file(config_path, tmp_path / "run")
        config = _config(run_dir)
        model = model_path(run_dir, 0)
        pointer = read_pointer(model_pointer_path(run_dir, 0), config.run.run_id, 2)
        assert pointer.path == published_model_path(config.run.run_id, 0)
        assert pointer.mirrors == (0, 1)
        for root in mirror_roots:
            assert (root / pointer.path).read_bytes() == model.read_bytes()
            on_mirror = sorted(p.name for p in (root / pointer.path).parent.iterdir())
            assert on_mirror == [PAYLOAD_NAME, model.name]
        # The submit file transfers the pointer; the node fetches the model from the mirrors.
        assert "models/global_$(rtag).json" in (run_dir / NODE_SUBMIT).read_text()
        got = model_file(
            model_pointer_path(run_dir, 0), config.run.run_id, readers, 1, "", tmp_path / "job"
        )
        assert got.path.read_bytes() == model.read_bytes() and got.how == "whole"
        assert got.moved.from_mirrors.model_in == pointer.bytes
        # Publishing again (a rerun of the aggregation) sends the model once more to each.
        assert publish_model(run_dir, config, 0) == 2 * pointer.bytes


def test_a_mirror_the_upload_missed_is_named_and_left_out_of_the_pointer(
    tiny_dataset: Path, tmp_path: Path, netrc_home: Path, capsys: pytest.CaptureFixture
) -> None:
    root = shutil.copytree(tiny_dataset, tmp_path / "mirror")
    run_dir = tmp_path / "run"
    (run_dir / "models").mkdir(parents=True)
    model = model_path(run_dir, 3)
    model.write_bytes(os.urandom(3000))
    server = writable(root)
    closed = MirrorServer(type("Closed", (FTPHandler,), {}))
    closed.close()  # its port refuses connections now
    try:
        with serve(root, k=1) as reader:
            gone = f"ftp://127.0.0.1:{closed.port}"
            good = f"ftp://{USER}@127.0.0.1:{server.port}"
            config = RunConfig().with_values(
                "data",
                mirrors=(f"ftp://127.0.0.1:{closed.port}", reader.urls[0]),
                publish=(gone, good),
            )
            config = config.with_values("run", run_id="r1")
            assert publish_model(run_dir, config, 3) == 3000
            path = published_model_path("r1", 3)
            assert f"publishing {path} on {gone} failed" in capsys.readouterr().out
            pointer = read_pointer(model_pointer_path(run_dir, 3), "r1", 2)
            assert pointer.mirrors == (1,)  # the nodes never ask the mirror that missed it
            mirrors = list(config.data.mirrors)
            got = model_file(model_pointer_path(run_dir, 3), "r1", mirrors, 0, "", tmp_path)
            assert got.path.read_bytes() == model.read_bytes()
            assert got.moved.from_mirrors.model_in == 3000
        with pytest.raises(UserError, match="no mirror in \\[data\\] publish took"):
            upload_files([gone], [(model, path)])
    finally:
        server.close()


def test_a_publish_password_comes_from_netrc_or_is_one_message(
    tiny_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    url = f"ftp://{USER}@127.0.0.1:1/data"
    with pytest.raises(UserError) as err:
        upload_files([url], [(model, "published/r/global_r000.safetensors")])
    assert f"[data] publish ftp://{USER}@127.0.0.1:1/data: cannot read ~/.netrc" in str(err.value)
    assert f"'machine 127.0.0.1 login {USER} password ...'" in str(err.value)
    (home / ".netrc").write_text("machine 127.0.0.1 login someone password x\n")
    (home / ".netrc").chmod(0o600)
    with pytest.raises(UserError, match=f"~/.netrc has no password for {USER} on 127.0.0.1"):
        upload_files([url], [(model, "published/r/global_r000.safetensors")])


def test_external_mirrors_without_publish_keep_file_transfer_and_say_so(
    tiny_config: Callable[..., Path], tiny_dataset: Path, tmp_path: Path, capsys
) -> None:
    with serve(tiny_dataset, k=2) as mirrors:
        run_dir = plan_from_file(
            tiny_config(data__mirrors=_toml_list(mirrors.urls)), tmp_path / "run"
        )
    assert "[data] publish is empty: each node job gets the global model" in (
        capsys.readouterr().err
    )
    assert "models/global_$(rtag).safetensors" in (run_dir / NODE_SUBMIT).read_text()
    assert not model_pointer_path(run_dir, 0).exists()


def _run_files(run_dir: Path) -> dict[str, bytes]:
    """Every model and update a run made, by its path in the run directory."""
    paths = [
        *run_dir.glob("models/global_r*.safetensors"),
        *run_dir.glob(f"rounds/*/*/{UPDATE_FILE}"),
    ]
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(paths)}


@pytest.mark.slow
def test_a_run_trains_the_same_bytes_from_published_models_as_by_file_transfer(
    tiny_config: Callable[..., Path], mirror_roots: list[Path], tmp_path: Path
) -> None:
    """The same run three ways: embedded mirrors serving the run's models, external mirrors with
    models uploaded by the aggregation ([data] publish), and external mirrors by file transfer."""
    overrides = {"run__nodes": "2", "run__rounds": "2"}
    embedded = plan_from_file(tiny_config(**overrides), tmp_path / "embedded")
    with ExitStack() as stack:
        readers = [stack.enter_context(serve(root, k=1)).urls[0] for root in mirror_roots]
        writers = [writable(root, user="") for root in mirror_roots]
        stack.callback(lambda: [w.close() for w in writers])
        publish = [f"ftp://127.0.0.1:{w.port}" for w in writers]
        mirrors = _toml_list(readers)
        published = plan_from_file(
            tiny_config(data__mirrors=mirrors, data__publish=_toml_list(publish), **overrides),
            tmp_path / "published",
        )
        transferred = plan_from_file(
            tiny_config(data__mirrors=mirrors, **overrides), tmp_path / "transferred"
        )
        for run_dir in (embedded, published, transferred):
            assert run_local(run_dir, slots=2, show_progress=False)["status"] == "completed"
        run_id = _config(published).run.run_id
        on_mirror = mirror_roots[0] / published_model_path(run_id, 2)
        assert on_mirror.read_bytes() == model_path(published, 2).read_bytes()
    files = _run_files(embedded)
    assert len(files) == 3 + 2 * 2
    assert _run_files(published) == files and _run_files(transferred) == files
    for run_dir, from_mirrors in ((embedded, True), (published, True), (transferred, False)):
        for metrics in run_dir.glob(f"rounds/*/*/{METRICS_FILE}"):
            fetched = json.loads(metrics.read_text())["bytes"]["from_mirrors"]
            model_in = fetched["model_in"] + fetched["model_delta_in"]
            assert (model_in > 0) == from_mirrors, (run_dir.name, metrics)
