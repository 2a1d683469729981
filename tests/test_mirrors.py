"""Embedded mirrors: real pyftpdlib servers on loopback, read-only, started and stopped fast."""

import io
import socket
import threading
import time
from collections.abc import Iterator
from ftplib import FTP, error_perm
from pathlib import Path

import pytest
from pyftpdlib.handlers import FTPHandler

from node_payload.common.errors import UserError
from pipeline import mirrors as mirrors_module
from pipeline.mirrors import (
    MAX_RANGES,
    MirrorServer,
    MultiRangeFTPHandler,
    RangeFTPHandler,
    free_ports,
    read_only_handler,
    serve,
    serve_forever,
)

MANIFEST = b'{"format": "dagtrain-dataset/1"}\n'


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Iterator[None]:
    yield
    assert not [t.name for t in threading.enumerate() if t.name.startswith("ftp-mirror")]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    (root / "shards").mkdir(parents=True)
    (root / "manifest.json").write_bytes(MANIFEST)
    (root / "shards" / "s00000.bin").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "secret.txt").write_text("outside the dataset")
    return root


def login(url: str) -> FTP:
    host, port = url.removeprefix("ftp://").split(":")
    ftp = FTP(timeout=5)
    ftp.connect(host, int(port))
    ftp.login()
    return ftp


def retr(ftp: FTP, path: str) -> bytes:
    buf = io.BytesIO()
    ftp.retrbinary(f"RETR {path}", buf.write)
    return buf.getvalue()


def test_serves_k_anonymous_read_only_mirrors(dataset: Path) -> None:
    with serve(dataset, k=3) as mirrors:
        assert len(set(mirrors.urls)) == 3
        for url in mirrors.urls:
            assert url.startswith("ftp://127.0.0.1:")
            ftp = login(url)
            try:
                assert retr(ftp, "manifest.json") == MANIFEST
                assert sorted(ftp.nlst("shards")) == ["s00000.bin"]
                with pytest.raises(error_perm):
                    ftp.storbinary("STOR new.bin", io.BytesIO(b"x"))
                with pytest.raises(error_perm):
                    ftp.delete("manifest.json")
                with pytest.raises(error_perm):
                    retr(ftp, "../secret.txt")
            finally:
                ftp.close()
    assert not (dataset / "new.bin").exists()


def test_given_ports_are_used(dataset: Path) -> None:
    ports = free_ports(2)
    with serve(dataset, ports=ports) as mirrors:
        assert mirrors.urls == [f"ftp://127.0.0.1:{p}" for p in ports]


def test_port_in_use_is_a_user_error_and_leaves_nothing_running(dataset: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=str(port)):
            serve(dataset, ports=[free_ports(1)[0], port])


def test_not_a_dataset_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"manifest\.json"):
        serve(tmp_path, k=1)


def test_close_is_fast_even_with_connected_clients(dataset: Path) -> None:
    mirrors = serve(dataset, k=2)
    clients = [login(url) for url in mirrors.urls]
    started = time.monotonic()
    mirrors.close()
    assert time.monotonic() - started < 0.5
    for ftp in clients:
        with pytest.raises((EOFError, OSError)):
            ftp.voidcmd("NOOP")
        ftp.close()


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_serve_forever_prints_urls_until_interrupted(dataset, monkeypatch, capsys) -> None:
    reachable = []

    def interrupt() -> None:
        url = capsys.readouterr().out.split('"')[1]
        reachable.append(retr(login(url), "manifest.json"))
        raise KeyboardInterrupt

    monkeypatch.setattr(mirrors_module, "_block", interrupt)
    serve_forever(dataset, 2)
    assert reachable == [MANIFEST]
    assert "Stopped" in capsys.readouterr().out


SHARD = bytes(range(256)) * 10  # shards/s00000.bin of the dataset fixture


@pytest.mark.parametrize("sendfile", [True, False])
def test_rang_ends_the_next_retr_at_the_range_end(dataset: Path, sendfile: bool) -> None:
    base = type("Ranged", (RangeFTPHandler,), {"use_sendfile": sendfile})
    server = MirrorServer(read_only_handler(dataset, base))
    ftp = login(server.url)
    try:
        assert "RANG STREAM" in ftp.sendcmd("FEAT")
        ftp.voidcmd("TYPE I")
        assert ftp.sendcmd("RANG 10 1033").startswith("350")
        assert retr(ftp, "shards/s00000.bin") == SHARD[10:1034]  # retr reads until the end
        assert retr(ftp, "shards/s00000.bin") == SHARD  # the range applied to one RETR only
        ftp.sendcmd("RANG 5 9")
        ftp.sendcmd("REST 2000")  # REST forgets the range
        assert retr(ftp, "shards/s00000.bin") == SHARD[2000:]
        ftp.sendcmd("RANG 5 9")
        with pytest.raises(error_perm):
            retr(ftp, "shards/missing.bin")
        assert retr(ftp, "shards/s00000.bin") == SHARD  # nor does a failed RETR pass it on
        for bad in ("RANG 9 5", "RANG 5", "RANG -1 5", "RANG a b"):
            with pytest.raises(error_perm, match="501"):
                ftp.sendcmd(bad)
    finally:
        ftp.close()
        server.close()


@pytest.mark.parametrize(("handler", "command"), [(FTPHandler, "RANG"), (RangeFTPHandler, "MRNG")])
def test_a_handler_neither_announces_nor_takes_what_it_lacks(
    dataset: Path, handler: type[FTPHandler], command: str
) -> None:
    server = MirrorServer(read_only_handler(dataset, handler))
    ftp = login(server.url)
    try:
        assert command not in ftp.sendcmd("FEAT")
        with pytest.raises(error_perm):
            ftp.sendcmd(f"{command} 0 9")
    finally:
        ftp.close()
        server.close()


@pytest.mark.parametrize("sendfile", [True, False])
def test_mrng_ranges_come_concatenated_in_the_order_asked(dataset: Path, sendfile: bool) -> None:
    base = type("MultiRanged", (MultiRangeFTPHandler,), {"use_sendfile": sendfile})
    server = MirrorServer(read_only_handler(dataset, base))
    ftp = login(server.url)
    path = "shards/s00000.bin"
    try:
        features = ftp.sendcmd("FEAT").splitlines()
        assert f" MRNG {MAX_RANGES}" in features and " RANG STREAM" in features
        ftp.voidcmd("TYPE I")
        assert ftp.sendcmd("MRNG 2000 2099 10 19").startswith("350 Ranges 1 to 2 ")
        assert ftp.sendcmd("MRNG 2550 2559").startswith("350 Ranges 3 to 3 ")
        assert ftp.sendcmd("MRNG 15 15").startswith("350 Ranges 4 to 4 ")
        asked = SHARD[2000:2100] + SHARD[10:20] + SHARD[2550:2560] + SHARD[15:16]
        assert retr(ftp, path) == asked
        assert retr(ftp, path) == SHARD  # the ranges applied to one RETR only
        ftp.sendcmd("RANG 100 109")  # RANG starts the list afresh, MRNG adds to it
        ftp.sendcmd("MRNG 0 4")
        assert retr(ftp, path) == SHARD[100:110] + SHARD[0:5]
        ftp.sendcmd("MRNG 0 4")
        ftp.sendcmd("REST 2500")  # REST forgets the ranges
        assert retr(ftp, path) == SHARD[2500:]
        ftp.sendcmd("MRNG 0 4")
        with pytest.raises(error_perm):
            retr(ftp, "shards/missing.bin")
        assert retr(ftp, path) == SHARD  # nor does a failed RETR pass them on
        ftp.sendcmd("MRNG 0 4")
        ftp.sendcmd("MRNG 2555 2600")  # past the end of the file: the transfer ends there
        ftp.sendcmd("MRNG 5 9")
        assert retr(ftp, path) == SHARD[0:5] + SHARD[2555:]
        for bad in ("MRNG 0 4 5", "MRNG", "MRNG 0 4 9 5", "MRNG 0 4 a b"):
            with pytest.raises(error_perm, match="501"):
                ftp.sendcmd(bad)
        ftp.voidcmd("TYPE A")
        with pytest.raises(error_perm, match="501"):
            ftp.sendcmd("MRNG 0 4")
    finally:
        ftp.close()
        server.close()


def test_embedded_mirrors_take_many_ranges(dataset: Path) -> None:
    with serve(dataset, k=1) as mirrors:
        ftp = login(mirrors.urls[0])
        try:
            assert f"MRNG {MAX_RANGES}" in ftp.sendcmd("FEAT")
        finally:
            ftp.close()
