"""`dagtrain upload` against real servers: writable pyftpdlib on loopback, and OpenSSH's sftp
server inside the pool's root (tests marked `pool`)."""

from __future__ import annotations

import filecmp
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import paramiko
import pytest
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler

from node_payload.common.errors import UserError
from node_payload.common.manifest import Manifest
from pipeline.cli import main
from pipeline.mirrors import MirrorServer, free_ports
from pipeline.remote import Target
from pipeline.sftp_transport import parse_sftp_url
from pipeline.upload import upload
from tests.condor_pool.pool import JOB_USER, CondorPool

PASSWORD = "s3cr@t:pw"


@dataclass
class FtpMirror:
    """A writable FTP server whose dataset root is `root`; records every command."""

    server: MirrorServer
    root: Path
    commands: list[tuple[str, str]]

    @property
    def url(self) -> str:
        return f"ftp://up:{quote(PASSWORD, safe='')}@127.0.0.1:{self.server.port}/data/set"

    @property
    def label(self) -> str:
        return f"ftp://up@127.0.0.1:{self.server.port}/data/set"

    def sent(self, cmd: str) -> list[str]:
        return [arg for c, arg in self.commands if c == cmd]


class RecordingHandler(FTPHandler):
    commands: list[tuple[str, str]]

    def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
        self.commands.append((cmd, arg))
        super().pre_process_command(line, cmd, arg)


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Iterator[None]:
    yield
    assert not [t.name for t in threading.enumerate() if t.name.startswith("ftp-mirror")]


@contextmanager
def writable_mirror(home: Path) -> Iterator[FtpMirror]:
    """A pyftpdlib server with a writable user "up" whose home is `home`, recording commands."""
    home.mkdir()
    authorizer = DummyAuthorizer()
    authorizer.add_user("up", PASSWORD, str(home), perm="elradfmwMT")
    commands: list[tuple[str, str]] = []
    handler = type(
        "Writable", (RecordingHandler,), {"authorizer": authorizer, "commands": commands}
    )
    server = MirrorServer(handler)
    try:
        yield FtpMirror(server, home / "data" / "set", commands)
    finally:
        server.close()


@pytest.fixture
def ftp_mirror(tmp_path: Path) -> Iterator[FtpMirror]:
    with writable_mirror(tmp_path / "ftp-home") as mirror:
        yield mirror


def same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    if files != sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()):
        return False
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def shard(dataset: Path) -> str:
    return Manifest.load(dataset / "manifest.json").files()[0].path


def test_upload_then_again_keeps_everything(tiny_dataset: Path, ftp_mirror: FtpMirror) -> None:
    (result,) = upload(tiny_dataset, [ftp_mirror.url])
    assert same_tree(tiny_dataset, ftp_mirror.root)
    files = len(Manifest.load(tiny_dataset / "manifest.json").files())
    assert (result.sent_files, result.kept_files) == (files + 1, 0)
    # Nothing is ever written under a final name, and the manifest comes last.
    stored = ftp_mirror.sent("STOR")
    assert stored and all(Path(p).name.startswith(".") and p.endswith(".part") for p in stored)
    assert ftp_mirror.sent("RNTO")[-1].endswith("/manifest.json")
    assert PASSWORD not in result.label

    ftp_mirror.commands.clear()
    (again,) = upload(tiny_dataset, [ftp_mirror.url])
    assert (again.sent_files, again.kept_files, again.sent_bytes) == (0, files + 1, 0)
    assert ftp_mirror.sent("STOR") == []
    assert len(ftp_mirror.sent("RETR")) >= files  # verified by reading the files back

    ftp_mirror.commands.clear()
    upload(tiny_dataset, [ftp_mirror.url], verify=False)
    assert ftp_mirror.sent("STOR") == []
    assert ftp_mirror.sent("RETR") == ["data/set/manifest.json"]  # sizes only


def test_partial_file_is_continued(tiny_dataset: Path, ftp_mirror: FtpMirror) -> None:
    path = shard(tiny_dataset)
    data = (tiny_dataset / path).read_bytes()
    part = ftp_mirror.root / path
    part = part.with_name(f".{part.name}.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[: len(data) // 2])

    (result,) = upload(tiny_dataset, [ftp_mirror.url])
    assert same_tree(tiny_dataset, ftp_mirror.root)
    assert ftp_mirror.sent("REST") == [str(len(data) // 2)]
    assert result.resumed_bytes == len(data) // 2
    manifest_size = (tiny_dataset / "manifest.json").stat().st_size
    assert result.sent_bytes == len(data) - len(data) // 2 + manifest_size


def test_wrong_partial_and_corrupt_files_are_sent_again(
    tiny_dataset: Path, ftp_mirror: FtpMirror
) -> None:
    path = shard(tiny_dataset)
    data = (tiny_dataset / path).read_bytes()
    final = ftp_mirror.root / path
    final.parent.mkdir(parents=True)
    final.write_bytes(bytes(b ^ 1 for b in data))  # the right size, the wrong bytes
    final.with_name(f".{final.name}.part").write_bytes(b"x" * 100)  # a stale start

    (result,) = upload(tiny_dataset, [ftp_mirror.url], verify=False)
    assert same_tree(tiny_dataset, ftp_mirror.root) is False  # sizes only: the bad file stays
    (result,) = upload(tiny_dataset, [ftp_mirror.url])
    assert same_tree(tiny_dataset, ftp_mirror.root)
    assert result.sent_files == 1 and result.resumed_bytes == 0


def test_other_dataset_is_refused_then_replaced(
    tiny_dataset: Path, ftp_mirror: FtpMirror, ftp_mirror_2: FtpMirror
) -> None:
    old = ftp_mirror.root
    (old / "shards").mkdir(parents=True)
    (old / "manifest.json").write_bytes(b'{"format": "dagtrain-dataset/2", "other": 1}')
    (old / shard(tiny_dataset)).write_bytes(b"old shard")
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}

    with pytest.raises(UserError) as err:
        upload(tiny_dataset, [ftp_mirror_2.url, ftp_mirror.url])
    message = str(err.value)
    assert ftp_mirror.label in message and ftp_mirror_2.label not in message
    assert "--replace" in message and PASSWORD not in message
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    assert ftp_mirror.sent("STOR") == ftp_mirror_2.sent("STOR") == []  # no mirror was touched

    (result, _) = upload(tiny_dataset, [ftp_mirror.url, ftp_mirror_2.url], replace=True)
    assert result.replaced
    assert same_tree(tiny_dataset, ftp_mirror.root)
    assert same_tree(tiny_dataset, ftp_mirror_2.root)
    commands = [c for c, _ in ftp_mirror.commands]
    assert commands.index("DELE") < commands.index("STOR")  # old manifest gone before any write
    assert ftp_mirror.sent("DELE")[0].endswith("manifest.json")


@pytest.fixture
def ftp_mirror_2(tmp_path: Path) -> Iterator[FtpMirror]:
    with writable_mirror(tmp_path / "ftp-home-2") as mirror:
        yield mirror


def test_bad_mirrors_and_datasets_are_named(tiny_dataset: Path, tmp_path: Path) -> None:
    dead = f"ftp://up:{quote(PASSWORD, safe='')}@127.0.0.1:{free_ports(1)[0]}/x"
    with pytest.raises(UserError, match=r"ftp://up@127\.0\.0\.1:\d+/x: cannot log in") as err:
        upload(tiny_dataset, [dead])
    assert PASSWORD not in str(err.value)
    with pytest.raises(UserError, match="expected an ftp:// or sftp:// URL"):
        upload(tiny_dataset, ["http://example.org/x"])
    with pytest.raises(UserError, match=r"no manifest\.json"):
        upload(tmp_path, ["ftp://127.0.0.1/x"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_bytes((tiny_dataset / "manifest.json").read_bytes())
    with pytest.raises(UserError, match="missing; the prepared dataset is incomplete"):
        upload(broken, ["ftp://127.0.0.1/x"])


def test_cli_upload(tiny_dataset: Path, ftp_mirror: FtpMirror, capsys) -> None:
    assert main(["upload", str(tiny_dataset), ftp_mirror.url]) == 0
    assert "file(s) sent" in capsys.readouterr().err
    assert same_tree(tiny_dataset, ftp_mirror.root)
    (ftp_mirror.root / "manifest.json").write_bytes(b"{}")
    assert main(["upload", str(tiny_dataset), ftp_mirror.url]) == 2
    err = capsys.readouterr().err
    assert ftp_mirror.label in err and "Traceback" not in err


def test_parse_sftp_url() -> None:
    home = parse_sftp_url("sftp://alice@mirror.example.org/~/datasets/tex")
    assert home.target == Target("alice", "mirror.example.org", 22)
    assert home.root == "~/datasets/tex"
    absolute = parse_sftp_url("sftp://alice@10.0.0.5:2222/srv/ftp/tex/")
    assert (absolute.target.port, absolute.root) == (2222, "/srv/ftp/tex")
    assert parse_sftp_url("sftp://h").root == "~"
    with pytest.raises(UserError, match="no password"):
        parse_sftp_url("sftp://alice:pw@h/x")
    with pytest.raises(UserError, match="expected sftp://"):
        parse_sftp_url("sftp:///x")


# ---------------------------------------------------------------- OpenSSH in the pool's root


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.pool
def test_sftp_upload_resumes_and_checks_host_keys(
    tiny_dataset: Path, condor_pool: CondorPool, tmp_path: Path
) -> None:
    key = paramiko.RSAKey.generate(2048)
    identity = tmp_path / "id_rsa"
    key.write_private_key_file(str(identity))
    sshd = condor_pool.start_sshd(_free_port(), f"{key.get_name()} {key.get_base64()}")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line())
    remote = condor_pool.root / condor_pool.home.lstrip("/") / "mirror-test" / "tex"
    url = f"sftp://{JOB_USER}@127.0.0.1:{sshd.port}/~/mirror-test/tex"
    try:
        path = shard(tiny_dataset)
        data = (tiny_dataset / path).read_bytes()
        part = remote / path
        part = part.with_name(f".{part.name}.part")
        part.parent.mkdir(parents=True)
        part.write_bytes(data[:1000])
        condor_pool.own(remote.parent)

        (result,) = upload(tiny_dataset, [url], known_hosts=known_hosts, identity=identity)
        assert same_tree(tiny_dataset, remote)
        assert result.resumed_bytes == 1000
        (again,) = upload(tiny_dataset, [url], known_hosts=known_hosts, identity=identity)
        assert again.sent_files == 0

        (remote / "manifest.json").write_bytes(b"{}")
        with pytest.raises(UserError, match="another dataset"):
            upload(tiny_dataset, [url], known_hosts=known_hosts, identity=identity)
        upload(tiny_dataset, [url], known_hosts=known_hosts, identity=identity, replace=True)
        assert same_tree(tiny_dataset, remote)

        strange = tmp_path / "empty_known_hosts"
        strange.write_text("")
        with pytest.raises(UserError, match="not a known host"):
            upload(tiny_dataset, [url], known_hosts=strange, identity=identity)
    finally:
        sshd.stop()
        condor_pool.run(["rm", "-rf", f"{condor_pool.home}/mirror-test"], cwd=Path("/"))
