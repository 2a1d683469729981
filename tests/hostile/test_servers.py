"""Hostile mirrors and manifests: real pyftpdlib servers on loopback that lie.

A mirror is anyone's FTP server and a manifest anyone's file. Each lie must end in one of three
ways, never in a traceback or a buffer the size of a claim: the node fails over to the next
mirror with one log line naming the mirror and the lie (exit 75 when every mirror lies), the plan
refuses the mirror or manifest naming it and the numbers, or the lie has no effect because the
node never asked (a shard's SIZE, bytes past a read's end).
"""

import hashlib
import io
import itertools
import json
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from ftplib import FTP, error_perm
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.filesystems import AbstractedFS
from pyftpdlib.handlers import FTPHandler

from node_payload import fetch
from node_payload.cli import main as node_main
from node_payload.common.errors import EXIT_FATAL, EXIT_OK, EXIT_RETRYABLE, UserError
from node_payload.common.manifest import FORMAT_SHA256, HASH_HEX, Block, Manifest, encode
from node_payload.common.manifest_limits import MAX_DATASET_BYTES, MAX_MANIFEST_BYTES
from node_payload.common.run_config import read_run_config
from node_payload.common.run_layout import model_path
from node_payload.fetch import DataUnreachable, FetchStats, fetch_fragments
from node_payload.local_data import BlockSource, fetch_raw, planned_manifest
from pipeline.cli import main
from pipeline.mirror_check import check_mirrors
from pipeline.mirrors import (
    MAX_OFFSET,
    MAX_RANGES,
    MirrorServer,
    MultiRangeFTPHandler,
    RangeFTPHandler,
    read_only_handler,
    serve,
)
from pipeline.planner import plan_from_file
from tests.dropping_mirror import DroppingFile

TB = 10**12


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Iterator[None]:
    yield
    assert not [t.name for t in threading.enumerate() if t.name.startswith("ftp-mirror")]


@pytest.fixture
def mirror(tiny_dataset: Path) -> Iterator[Callable[..., str]]:
    """Starts a mirror of the tiny dataset (or of `root`) with a handler class; returns its URL."""
    servers: list[MirrorServer] = []

    def start(base: type[FTPHandler], root: Path = tiny_dataset, port: int = 0, **attrs) -> str:
        """attrs override the handler's class attributes, the read-only authorizer included."""
        handler = type(base.__name__, (read_only_handler(root, base),), attrs)
        servers.append(MirrorServer(handler, port))
        return servers[-1].url

    yield start
    for server in servers:
        server.stop()
    for server in servers:
        server.close()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The fetch's own log lines (pyftpdlib's go to its own logger)."""
    return [r.getMessage() for r in caplog.records if r.name == fetch.__name__]


def digest(dataset: Path) -> str:
    return Manifest.load(dataset / "manifest.json").digest()


class LyingSize(FTPHandler):
    """Answers SIZE of the files whose name ends with `lie_about` with `claim` (a plain server)."""

    lie_about = "manifest.json"
    claim = str(TB)

    def ftp_SIZE(self, path: str) -> None:
        if path.endswith(self.lie_about):
            self.respond(f"213 {self.claim}")
        else:
            super().ftp_SIZE(path)


class _EndlessFile(io.FileIO):
    """A shard that never ends and never moves: whatever range is asked, 0xAA bytes forever."""

    def read(self, size: int = -1) -> bytes:
        return b"\xaa" * (size if size > 0 else 65536)


class _EndlessFS(AbstractedFS):
    def open(self, filename: str, mode: str) -> io.FileIO:
        if "/shards/" in filename:
            return _EndlessFile(filename, "rb")
        return super().open(filename, mode)


class EndlessShards(RangeFTPHandler):
    """Announces RANG STREAM, then sends past every range end (and the wrong bytes)."""

    use_sendfile = False  # sendfile would bypass the file object's read()
    abstracted_fs = _EndlessFS


def another_dataset(dataset: Path, dest: Path) -> Path:
    """The same shards under a manifest that differs (another seed): another dataset."""
    other = shutil.copytree(dataset, dest)
    doc = json.loads((other / "manifest.json").read_bytes())
    doc["seed"] += 1
    (other / "manifest.json").write_bytes(encode(doc))
    return other


@pytest.mark.parametrize(
    ("claim", "lie"),
    [
        (str(TB), f"SIZE says manifest.json is {TB} bytes, more than {MAX_MANIFEST_BYTES}"),
        ("-5", "no size for manifest.json (SIZE answered '213 -5')"),
        ("12abc", "no size for manifest.json (SIZE answered '213 12abc')"),
    ],
)
def test_a_mirror_lying_about_the_manifest_size_is_passed_over_in_one_line(
    tiny_dataset: Path, mirror: Callable[..., str], caplog, claim: str, lie: str
) -> None:
    liar = mirror(LyingSize, claim=claim)
    good = mirror(RangeFTPHandler)
    stats = FetchStats()
    manifest = planned_manifest([liar, good], 0, digest(tiny_dataset), stats)
    assert manifest.digest() == digest(tiny_dataset)
    (line,) = warnings(caplog)
    assert liar in line and lie in line
    assert stats.failovers == 1
    assert liar not in stats.per_mirror_bytes  # not one byte read on the strength of the claim


@pytest.mark.parametrize("base", [FTPHandler, RangeFTPHandler])  # plain, or told the range end
def test_a_mirror_sending_more_of_the_manifest_than_its_size_is_passed_over(
    tiny_dataset: Path, mirror: Callable[..., str], caplog, base: type[FTPHandler]
) -> None:
    half = (tiny_dataset / "manifest.json").stat().st_size // 2
    liar = mirror(type("LyingSize", (LyingSize, base), {}), claim=str(half))
    good = mirror(RangeFTPHandler)
    stats = FetchStats()
    planned_manifest([liar, good], 0, digest(tiny_dataset), stats)
    (line,) = warnings(caplog)
    assert liar in line and "serves a different manifest.json than the run was planned" in line
    assert f"({half} bytes, sha256" in line
    assert stats.per_mirror_bytes[liar] == half  # nothing past the claim is read


def test_a_mirror_serving_another_manifest_is_passed_over_in_one_line(
    tiny_dataset: Path, mirror: Callable[..., str], tmp_path: Path, caplog
) -> None:
    stale = mirror(RangeFTPHandler, another_dataset(tiny_dataset, tmp_path / "other"))
    good = mirror(RangeFTPHandler)
    stats = FetchStats()
    manifest = planned_manifest([stale, good], 0, digest(tiny_dataset), stats)
    assert manifest.digest() == digest(tiny_dataset)
    (line,) = warnings(caplog)
    assert stale in line and "serves a different manifest.json than the run was planned" in line


def test_a_mirror_lying_about_a_shard_size_is_never_asked(
    tiny_dataset: Path, mirror: Callable[..., str]
) -> None:
    """Shard reads take their lengths from the manifest alone: the lie is never heard."""
    commands: list[str] = []

    class Recording(LyingSize):
        lie_about = ".bin"

        def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
            commands.append(cmd)
            super().pre_process_command(line, cmd, arg)

    liar = mirror(Recording)
    manifest = Manifest.load(tiny_dataset / "manifest.json")
    ids = list(range(0, len(manifest), 9))
    stats = FetchStats()
    blobs = fetch_raw(manifest, ids, BlockSource([liar], 0, stats))
    assert set(blobs) == {b.id for b in manifest.blocks_under(ids)}
    assert stats.failovers == 0 and "RETR" in commands and "SIZE" not in commands


def test_a_mirror_sending_past_the_range_end_is_read_only_to_it(
    tiny_dataset: Path, mirror: Callable[..., str], caplog
) -> None:
    endless = mirror(EndlessShards)
    good = mirror(RangeFTPHandler)
    manifest = Manifest.load(tiny_dataset / "manifest.json")
    (block, *_), _ = manifest.blocks(manifest.fragment(0))
    stats = FetchStats()
    got = fetch_fragments([endless, good], 0, [block], stats, timeout_s=5)
    shard = (tiny_dataset / block.shard).read_bytes()
    assert got == {block.id: shard[block.offset : block.offset + block.length]}
    assert stats.per_mirror_bytes[endless] == block.length  # nothing past what was asked
    (line,) = warnings(caplog)
    assert endless in line and f"blake3 mismatch for fragment {block.id}" in line


def test_a_mirror_whose_reply_never_ends_is_passed_over(
    tiny_dataset: Path, mirror: Callable[..., str], caplog
) -> None:
    chatty = mirror(RangeFTPHandler, banner=("x" * 70 + "\r\n") * 2000)  # a 142 KB greeting
    good = mirror(RangeFTPHandler)
    planned_manifest([chatty, good], 0, digest(tiny_dataset), FetchStats())
    (line,) = warnings(caplog)
    assert chatty in line and f"a reply of more than {fetch.MAX_REPLY} bytes" in line


def test_a_node_exits_75_at_once_when_every_mirror_lies(
    tiny_config: Callable[..., Path],
    tiny_dataset: Path,
    mirror: Callable[..., str],
    tmp_path: Path,
    caplog,
    capsys,
    monkeypatch,
) -> None:
    run_dir = plan_from_file(tiny_config(data__embedded_mirrors="3"), tmp_path / "run")
    urls = read_run_config(run_dir / "config.toml").data.mirrors
    ports = [int(url.rsplit(":", 1)[1]) for url in urls]
    half = (tiny_dataset / "manifest.json").stat().st_size // 2
    mirror(LyingSize, port=ports[0])
    mirror(LyingSize, port=ports[1], claim=str(half))
    mirror(RangeFTPHandler, another_dataset(tiny_dataset, tmp_path / "other"), port=ports[2])
    pauses: list[float] = []
    monkeypatch.setattr(fetch.time, "sleep", pauses.append)
    args = ["--config", str(run_dir / "config.toml"), "--model", str(model_path(run_dir, 0))]
    args += ["--round", "0", "--node", "0", "--out", str(tmp_path / "n0")]
    assert node_main(args) == EXIT_RETRYABLE
    assert "data unreachable, retry later" in capsys.readouterr().err
    lines = warnings(caplog)
    assert len(lines) == 3  # one per mirror
    for url, lie in zip(
        urls,
        [f"{TB} bytes", f"({half} bytes, sha256", "serves a different"],
        strict=True,
    ):
        assert any(url in line and lie in line for line in lines), (url, lines)
    assert pauses == []  # a lie does not heal: no pass over the same mirrors again
    assert not (tmp_path / "n0" / "update.safetensors").exists()


def test_plan_refuses_a_mirror_lying_about_the_manifest_size(
    tiny_config: Callable[..., Path], mirror: Callable[..., str], tmp_path: Path, capsys
) -> None:
    liar, good = mirror(LyingSize), mirror(RangeFTPHandler)
    config = tiny_config(data__mirrors=json.dumps([liar, good]))
    assert main(["plan", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert liar in err and f"manifest.json is {TB} bytes" in err and "Traceback" not in err
    assert good not in err
    assert not (tmp_path / "run").exists()


def test_plan_refuses_a_mirror_with_another_manifest(
    tiny_config: Callable[..., Path], tiny_dataset: Path, tmp_path: Path, capsys
) -> None:
    other = another_dataset(tiny_dataset, tmp_path / "other")
    with serve(tiny_dataset, k=1) as good, serve(other, k=1) as stale:
        mirrors = json.dumps([*good.urls, *stale.urls])
        config = tiny_config(data__mirrors=mirrors)
        assert main(["plan", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert stale.urls[0] in err and good.urls[0] not in err
    assert "different manifest.json" in err and "dagtrain upload" in err
    assert not (tmp_path / "run").exists()


def test_a_refused_login_names_the_mirror_and_the_user(
    tiny_dataset: Path, mirror: Callable[..., str], caplog, capsys
) -> None:
    authorizer = DummyAuthorizer()
    authorizer.add_user("alice", "right", str(tiny_dataset.parent), perm="elr")
    base = mirror(FTPHandler, authorizer=authorizer, auth_failed_timeout=0)
    url = base.replace("ftp://", "ftp://alice:wrong@") + f"/{tiny_dataset.name}"
    label = base.replace("ftp://", "ftp://alice@") + f"/{tiny_dataset.name}"
    good = mirror(RangeFTPHandler)

    check_mirrors([url, good], digest(tiny_dataset))
    err = capsys.readouterr().err
    assert label in err and "login as 'alice' refused" in err
    assert "[data] mirrors" in err and "unreachable" not in err and "wrong" not in err

    planned_manifest([url, good], 0, digest(tiny_dataset), FetchStats())  # nodes skip it
    (line,) = warnings(caplog)
    assert label in line and "login as 'alice' refused" in line


def dataset_with(tiny_dataset: Path, dest: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    copy = shutil.copytree(tiny_dataset, dest)
    doc = json.loads((copy / "manifest.json").read_bytes())
    edit(doc)
    (copy / "manifest.json").write_bytes(encode(doc))
    return copy


def test_plan_refuses_a_manifest_claiming_terabytes(
    tiny_config: Callable[..., Path], tiny_dataset: Path, tmp_path: Path, capsys
) -> None:
    def claim(doc: dict[str, Any]) -> None:
        doc["shards"][0]["bytes"] = 48 * TB

    dataset = dataset_with(tiny_dataset, tmp_path / "big", claim)
    config = tiny_config(data__dataset=json.dumps(str(dataset)))
    assert main(["plan", str(config), "--out", str(tmp_path / "run")]) == 2
    err = " ".join(capsys.readouterr().err.split())  # as one line, however it was wrapped
    assert f"the shards claim {48 * TB} bytes in all, more than the {MAX_DATASET_BYTES}" in err
    assert "manifest.json" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def _terabyte_block(doc: dict[str, Any]) -> None:
    doc["sources"][0]["lengths"][3] = TB
    doc["shards"][doc["sources"][0]["shard"]]["bytes"] += TB


def _swollen_shard(doc: dict[str, Any]) -> None:
    doc["shards"][0]["bytes"] = 10**11


def _huge_blocks(doc: dict[str, Any]) -> None:
    doc["block"] = 100_000


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_terabyte_block, rf"block 3 claims {TB} bytes, more than a \d+ x \d+ \w+ block can take"),
        (_swollen_shard, rf"claims {10**11} bytes, more than the blocks of its sources can take"),
        (_huge_blocks, "block is 100000 px, more than the 4096 px"),
    ],
)
def test_implausible_manifest_sizes_are_refused_with_the_numbers(
    tiny_dataset: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    doc = json.loads((tiny_dataset / "manifest.json").read_bytes())
    edit(doc)
    with pytest.raises(UserError, match=message):
        Manifest.from_bytes(encode(doc), "ds/manifest.json")


def test_a_manifest_longer_than_the_cap_is_refused_to_plan_and_to_fetch(
    tiny_dataset: Path, mirror: Callable[..., str], monkeypatch
) -> None:
    size = (tiny_dataset / "manifest.json").stat().st_size
    monkeypatch.setattr("node_payload.common.manifest.MAX_MANIFEST_BYTES", size - 1)
    with pytest.raises(UserError, match=rf"the manifest is {size} bytes, more than the {size - 1}"):
        Manifest.load(tiny_dataset / "manifest.json")
    monkeypatch.setattr("node_payload.fetch.MAX_MANIFEST_BYTES", size - 1)
    with pytest.raises(DataUnreachable, match=rf"manifest.json is {size} bytes, more than"):
        planned_manifest([mirror(RangeFTPHandler)], 0, "", FetchStats())


@pytest.mark.parametrize(
    "path",
    [
        "../outside.bin",
        "shards/../../x.bin",
        "..",
        "/etc/passwd",
        "C:x",
        "shards\\..\\..\\x.bin",
        "shards/s\x00.bin",
        "shards/s.bin\r\nDELE manifest.json",
        "",
        ".",
        "./shards/s00000.bin",
        "shards//s00000.bin",
    ],
)
@pytest.mark.parametrize("kind", ["shards", "sources"])
def test_manifest_paths_must_stay_inside_the_root(tiny_dataset: Path, kind: str, path: str) -> None:
    doc = json.loads((tiny_dataset / "manifest.json").read_bytes())
    doc[kind][0]["path"] = path
    with pytest.raises(UserError) as error:
        Manifest.from_bytes(encode(doc), "data/manifest.json")
    assert "data/manifest.json" in str(error.value) and repr(path) in str(error.value)


def sha256_dataset(dataset: Path, dest: Path) -> Path:
    """The dataset as format dagtrain-dataset/2 described it: no block_hash, sha256 prefixes."""
    copy = shutil.copytree(dataset, dest)
    doc = json.loads((copy / "manifest.json").read_bytes())
    doc["format"] = FORMAT_SHA256
    del doc["block_hash"]
    for source in doc["sources"]:
        shard = (copy / doc["shards"][source["shard"]]["path"]).read_bytes()
        starts = itertools.accumulate(source["lengths"], initial=source["offset"])
        source["hashes"] = "".join(
            hashlib.sha256(shard[start : start + n]).hexdigest()[:HASH_HEX]
            for start, n in zip(starts, source["lengths"], strict=False)
        )
    (copy / "manifest.json").write_bytes(encode(doc))
    return copy


def with_a_flipped_bit(dataset: Path, dest: Path, block: Block) -> Path:
    """A copy whose shard differs from the dataset in one bit of the block, sizes unchanged."""
    copy = shutil.copytree(dataset, dest)
    shard = bytearray((copy / block.shard).read_bytes())
    shard[block.offset + block.length // 2] ^= 0x10
    (copy / block.shard).write_bytes(shard)
    return copy


@pytest.mark.parametrize("old_format", [False, True])
def test_a_block_that_does_not_match_its_hash_is_read_from_another_mirror(
    tiny_dataset: Path, mirror: Callable[..., str], tmp_path: Path, caplog, old_format: bool
) -> None:
    dataset = sha256_dataset(tiny_dataset, tmp_path / "old") if old_format else tiny_dataset
    manifest = Manifest.load(dataset / "manifest.json")
    (block, *_), _ = manifest.blocks(manifest.fragment(0))
    assert block.hash_name == ("sha256" if old_format else "blake3")
    bad = mirror(RangeFTPHandler, with_a_flipped_bit(dataset, tmp_path / "bad", block))
    good = mirror(RangeFTPHandler, dataset)
    stats = FetchStats()
    got = fetch_fragments([bad, good], 0, [block], stats)
    shard = (dataset / block.shard).read_bytes()
    assert got == {block.id: shard[block.offset : block.offset + block.length]}
    assert stats.failovers == 1
    (line,) = warnings(caplog)
    assert bad in line and f"{block.hash_name} mismatch for fragment {block.id}" in line


def test_a_block_no_mirror_serves_intact_is_never_returned(
    tiny_dataset: Path, mirror: Callable[..., str], tmp_path: Path, monkeypatch
) -> None:
    manifest = Manifest.load(tiny_dataset / "manifest.json")
    (block, *_), _ = manifest.blocks(manifest.fragment(0))
    bad = mirror(RangeFTPHandler, with_a_flipped_bit(tiny_dataset, tmp_path / "bad", block))
    monkeypatch.setattr(fetch.time, "sleep", lambda _s: None)
    with pytest.raises(DataUnreachable, match=f"blake3 mismatch for fragment {block.id}"):
        fetch_fragments([bad], 0, [block], FetchStats())


HASHES = f"hashes must be {HASH_HEX} hex digits per block"


def _no_block_hash(doc: dict[str, Any]) -> None:
    del doc["block_hash"]


def _old_format_naming_a_hash(doc: dict[str, Any]) -> None:
    doc["format"] = FORMAT_SHA256


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d.update(block_hash="md5"),
            "block_hash must be one of ['blake3', 'sha256'], not 'md5'",
        ),
        (lambda d: d.update(block_hash=["blake3"]), "block_hash must be one of"),
        (lambda d: d.update(block_hash="BLAKE3"), "not 'BLAKE3'"),
        (_no_block_hash, "missing keys ['block_hash']"),
        (_old_format_naming_a_hash, "unknown keys ['block_hash']"),
        (lambda d: d["sources"][1].update(hashes=d["sources"][1]["hashes"].upper()), HASHES),
        (lambda d: d["sources"][1].update(hashes=d["sources"][1]["hashes"][:-2]), HASHES),
    ],
)
def test_plan_refuses_a_manifest_with_a_bad_block_hash_naming_the_key(
    tiny_config: Callable[..., Path],
    tiny_dataset: Path,
    tmp_path: Path,
    capsys,
    edit: Callable[[dict[str, Any]], None],
    message: str,
) -> None:
    dataset = dataset_with(tiny_dataset, tmp_path / "bad", edit)
    config = tiny_config(data__dataset=json.dumps(str(dataset)))
    assert main(["plan", str(config), "--out", str(tmp_path / "run")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and str(dataset / "manifest.json") in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def _node_job(
    tiny_config: Callable[..., Path], dataset: Path, mirror: Callable[..., str], tmp_path: Path
) -> list[str]:
    """Plans a run over dataset with two mirrors of it; the arguments of its node 0 job."""
    config = tiny_config(data__dataset=json.dumps(str(dataset)), data__embedded_mirrors="2")
    run_dir = plan_from_file(config, tmp_path / "run")
    for url in read_run_config(run_dir / "config.toml").data.mirrors:
        mirror(RangeFTPHandler, dataset, port=int(url.rsplit(":", 1)[1]))
    args = ["--config", str(run_dir / "config.toml"), "--model", str(model_path(run_dir, 0))]
    return [*args, "--round", "0", "--node", "0", "--out", str(tmp_path / "n0")]


def test_a_dataset_of_the_sha256_format_still_trains(
    tiny_config: Callable[..., Path],
    tiny_dataset: Path,
    mirror: Callable[..., str],
    tmp_path: Path,
) -> None:
    old = sha256_dataset(tiny_dataset, tmp_path / "old")
    assert node_main(_node_job(tiny_config, old, mirror, tmp_path)) == EXIT_OK
    assert (tmp_path / "n0" / "update.safetensors").is_file()


def test_a_node_without_blake3_fails_fatally_naming_the_fix(
    tiny_config: Callable[..., Path],
    tiny_dataset: Path,
    mirror: Callable[..., str],
    tmp_path: Path,
    capsys,
    monkeypatch,
) -> None:
    args = _node_job(tiny_config, tiny_dataset, mirror, tmp_path)
    monkeypatch.setitem(sys.modules, "blake3", None)  # what `import blake3` finds without it
    assert node_main(args) == EXIT_FATAL
    err = capsys.readouterr().err
    assert "fatal:" in err and "no blake3 module" in err and "-m pip install blake3" in err
    assert "Traceback" not in err
    assert not (tmp_path / "n0" / "update.safetensors").exists()


class RefusingRanges(RangeFTPHandler):
    """Announces RANG STREAM, then refuses every RANG (and serves the RETR behind it whole)."""

    def ftp_RANG(self, line: str) -> None:
        self.respond("504 Ranges are off today.")


def test_a_mirror_refusing_the_range_it_announced_is_passed_over(
    tiny_dataset: Path, mirror: Callable[..., str], caplog
) -> None:
    """RANG and RETR go out together: a refused RANG leaves the RETR's replies to come, so the
    session is dropped rather than read out of step."""
    refusing = mirror(RefusingRanges)
    good = mirror(RangeFTPHandler)
    manifest = Manifest.load(tiny_dataset / "manifest.json")
    blocks = manifest.blocks_under(range(0, len(manifest), 7))
    stats = FetchStats()
    got = fetch_fragments([refusing, good], 0, blocks, stats)
    shard = {b.shard: (tiny_dataset / b.shard).read_bytes() for b in blocks}
    assert got == {b.id: shard[b.shard][b.offset : b.offset + b.length] for b in blocks}
    (line,) = warnings(caplog)
    assert refusing in line and "RANG refused: 504 Ranges are off today." in line


class RefusingPassive(RangeFTPHandler):
    """Announces RANG STREAM, then refuses every passive data connection."""

    def ftp_PASV(self, line: str) -> None:
        self.respond("425 No data connections today.")


def test_a_mirror_refusing_the_data_connection_is_passed_over(
    tiny_dataset: Path, mirror: Callable[..., str], caplog
) -> None:
    """PASV, RANG and RETR go out together: a refused PASV leaves the other replies to come, so
    the session is dropped rather than read out of step."""
    refusing = mirror(RefusingPassive)
    good = mirror(RangeFTPHandler)
    manifest = Manifest.load(tiny_dataset / "manifest.json")
    blocks = manifest.blocks_under(range(0, len(manifest), 7))
    got = fetch_fragments([refusing, good], 0, blocks, FetchStats())
    shard = {b.shard: (tiny_dataset / b.shard).read_bytes() for b in blocks}
    assert got == {b.id: shard[b.shard][b.offset : b.offset + b.length] for b in blocks}
    (line,) = warnings(caplog)
    assert refusing in line and "PASV refused: 425 No data connections today." in line


def test_a_passive_reply_naming_another_host_is_not_followed(
    tiny_dataset: Path, mirror: Callable[..., str], caplog
) -> None:
    """A data connection goes to the mirror's own address, whatever host PASV names."""
    elsewhere = mirror(RangeFTPHandler, masquerade_address="203.0.113.9")
    manifest = Manifest.load(tiny_dataset / "manifest.json")
    blocks = manifest.blocks_under(range(0, len(manifest), 7))
    stats = FetchStats()
    got = fetch_fragments([elsewhere], 0, blocks, stats, timeout_s=5)
    shard = {b.shard: (tiny_dataset / b.shard).read_bytes() for b in blocks}
    assert got == {b.id: shard[b.shard][b.offset : b.offset + b.length] for b in blocks}
    assert stats.failovers == 0 and warnings(caplog) == []


class ShortRanges(RangeFTPHandler):
    """Announces RANG STREAM, then ends every range halfway, with a 226 as if it were whole."""

    def ftp_RANG(self, line: str) -> None:
        super().ftp_RANG(line)
        if self._spans:
            (start, end), *_ = self._spans
            self._spans = [(start, end - (end - start) // 2)]


class WholeFiles(RangeFTPHandler):
    """Announces RANG STREAM, then forgets every range end: each read runs to the file's end."""

    def ftp_RANG(self, line: str) -> None:
        super().ftp_RANG(line)
        if self._spans:
            self._spans = [(self._spans[0][0], MAX_OFFSET)]


def coalesced_blocks(manifest: Manifest) -> list[Block]:
    """Blocks of one shard with small gaps between them: reads of several blocks each."""
    blocks = sorted(manifest.blocks_under(range(len(manifest))), key=lambda b: b.offset)
    shard = [b for b in blocks if b.shard == blocks[0].shard]
    return [b for k, b in enumerate(shard) if k % 5 != 4]


def _fetched_whole(
    dataset: Path, *urls: str, timeout_s: float = 20.0
) -> tuple[list[Block], FetchStats]:
    """A fetch of coalesced blocks from the mirrors in order, checked to give every block's very
    bytes whatever the first ones did."""
    blocks = coalesced_blocks(Manifest.load(dataset / "manifest.json"))
    stats = FetchStats()
    got = fetch_fragments(list(urls), 0, blocks, stats, timeout_s=timeout_s)
    shard = (dataset / blocks[0].shard).read_bytes()
    assert got == {b.id: shard[b.offset : b.offset + b.length] for b in blocks}
    return blocks, stats


def test_a_mirror_answering_a_coalesced_range_short_is_passed_over(
    tiny_dataset: Path, mirror: Callable[..., str], caplog
) -> None:
    short = mirror(ShortRanges)
    _, stats = _fetched_whole(tiny_dataset, short, mirror(RangeFTPHandler))
    assert stats.failovers >= 1
    assert warnings(caplog) and all(short in line and " of " in line for line in warnings(caplog))


def test_a_mirror_answering_a_coalesced_range_long_is_read_only_to_its_end(
    tiny_dataset: Path, mirror: Callable[..., str], caplog
) -> None:
    """The node stops reading at the range end it asked for: bytes past it are never counted,
    never buffered and never taken for a block."""
    blocks, stats = _fetched_whole(tiny_dataset, mirror(WholeFiles))
    needed = sum(b.length for b in blocks)
    assert needed <= stats.bytes_downloaded <= (1 + fetch.MAX_WASTE) * needed
    assert stats.failovers == 0 and warnings(caplog) == []


class StallingOneRead(RangeFTPHandler):
    """Announces RANG STREAM and serves every read but the second, which it never answers: one
    of a node's parallel connections hangs while the others flow."""

    retrs: ClassVar[list[str]]

    def ftp_RETR(self, file: str) -> str | None:
        self.retrs.append(file)
        if len(self.retrs) == 2:
            return None
        return super().ftp_RETR(file)


def test_a_mirror_stalling_one_of_a_nodes_connections_costs_that_read_a_timeout(
    tiny_dataset: Path, mirror: Callable[..., str], caplog
) -> None:
    """The stalled read times out and moves to the other mirror; the node's other connections
    keep their sessions and every block arrives verified."""
    retrs: list[str] = []
    stalling = mirror(StallingOneRead, retrs=retrs) + "?timeout=1"
    good = mirror(RangeFTPHandler)
    manifest = Manifest.load(tiny_dataset / "manifest.json")
    ids = list(range(0, len(manifest), 3))
    stats = FetchStats()
    blobs = fetch_raw(manifest, ids, BlockSource([stalling, good], 0, stats))
    blocks = manifest.blocks_under(ids)
    assert set(blobs) == {b.id for b in blocks}
    assert all(b.matches(blobs[b.id]) for b in blocks)
    assert len(retrs) >= 2 and stats.failovers >= 1
    assert any("timed out" in line for line in warnings(caplog))


class RefusingMultiRanges(MultiRangeFTPHandler):
    """Announces MRNG, then refuses every MRNG (and serves the RETR behind them whole)."""

    def ftp_MRNG(self, line: str) -> None:
        self.respond("504 Multi-ranges are off today.")


class OutOfStepMultiRanges(MultiRangeFTPHandler):
    """Announces MRNG, then answers each MRNG as if it were a finished command (200)."""

    def ftp_MRNG(self, line: str) -> None:
        self.respond("200 Noted.")


class _OtherSpans(MultiRangeFTPHandler):
    """Announces MRNG, then sends a multi-range RETR other spans than were asked (`spans`)."""

    def spans(self, asked: list[tuple[int, int]]) -> list[tuple[int, int]]:
        raise NotImplementedError

    def ftp_RETR(self, file: str) -> str | None:
        if self._spans and len(self._spans) > 1:
            self._spans = self.spans(self._spans)
        return super().ftp_RETR(file)


class ShortMultiRanges(_OtherSpans):
    """Ends the last range halfway, with a 226 as if the transfer were whole."""

    def spans(self, asked: list[tuple[int, int]]) -> list[tuple[int, int]]:
        *head, (start, end) = asked
        return [*head, (start, start + (end - start) // 2)]


class LongMultiRanges(_OtherSpans):
    """Sends a range more than asked, after the asked ones."""

    def spans(self, asked: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [*asked, (0, 65536)]


class SwappedMultiRanges(_OtherSpans):
    """Sends the asked ranges in reverse order: each in the place of another."""

    def spans(self, asked: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return asked[::-1]


class _DroppingFS(AbstractedFS):
    def open(self, filename: str, mode: str) -> io.FileIO:
        if "/shards/" in filename:
            return DroppingFile(filename, self.cmd_channel, first_chunk=1000)
        return super().open(filename, mode)


class DroppingMultiRanges(MultiRangeFTPHandler):
    """Announces MRNG, then closes both connections after the first 1000 bytes of a transfer."""

    use_sendfile = False  # sendfile would bypass the file object's read()
    abstracted_fs = _DroppingFS


@pytest.mark.parametrize(
    ("handler", "said"),
    [
        (RefusingMultiRanges, "MRNG refused: 504 Multi-ranges are off today."),
        (OutOfStepMultiRanges, "MRNG answered '200 Noted.'"),
        (ShortMultiRanges, " bytes from offset "),
        (SwappedMultiRanges, "blake3 mismatch for fragment"),
        (DroppingMultiRanges, "connection closed by the mirror"),
    ],
)
def test_a_mirror_mishandling_a_multi_range_read_is_passed_over(
    tiny_dataset: Path, mirror: Callable[..., str], caplog, handler: type, said: str
) -> None:
    """The ranges go out with PASV and RETR in one write: a refused or out-of-step answer drops
    the session; bytes short, cut off or of other ranges fail the read; each names the mirror
    once and the read moves to the next mirror."""
    hostile = mirror(handler)
    _, stats = _fetched_whole(tiny_dataset, hostile, mirror(MultiRangeFTPHandler), timeout_s=5)
    assert stats.failovers == 1
    (line,) = warnings(caplog)
    assert hostile in line and said in line


class StallingMidRanges(MultiRangeFTPHandler):
    """Announces MRNG, answers a read's first MRNG line, then no command after it (the other
    lines and the RETR sent with it included), as if it had hung."""

    def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
        if not self._spans:
            super().pre_process_command(line, cmd, arg)


def test_a_mirror_stalling_among_a_reads_range_lines_costs_that_read_a_timeout(
    tiny_dataset: Path, mirror: Callable[..., str], caplog, monkeypatch
) -> None:
    """A read's MRNG lines go out in one write: a mirror that stops answering after some of
    them costs one timeout, its session is dropped and the read moves to the next mirror."""
    monkeypatch.setattr(fetch, "RANGES_PER_LINE", 2)  # several lines in one read
    stalling = mirror(StallingMidRanges) + "?timeout=1"
    _, stats = _fetched_whole(tiny_dataset, stalling, mirror(MultiRangeFTPHandler), timeout_s=5)
    assert stats.failovers == 1 and stats.per_mirror_bytes.get(stalling, 0) == 0
    (line,) = warnings(caplog)
    assert stalling in line and "timed out" in line


def test_a_mirror_sending_a_range_more_is_read_only_to_the_asked_ones(
    tiny_dataset: Path, mirror: Callable[..., str], caplog
) -> None:
    """Bytes past the asked ranges' sum are never read, counted or taken for a block."""
    blocks, stats = _fetched_whole(tiny_dataset, mirror(LongMultiRanges))
    assert stats.bytes_downloaded == sum(b.length for b in blocks)
    assert stats.failovers == 0 and warnings(caplog) == []


def test_a_client_queueing_too_many_or_absurd_ranges_is_refused_and_others_served(
    tiny_dataset: Path, mirror: Callable[..., str]
) -> None:
    """Our mirror holds at most MAX_RANGES ranges for a client (refused beyond with 552, cleared
    by the RETR) and refuses ranges it cannot seek to; meanwhile it serves another node."""
    url = mirror(MultiRangeFTPHandler)
    host, port = url.removeprefix("ftp://").split(":")
    greedy = FTP(timeout=5)
    greedy.connect(host, int(port))
    try:
        greedy.login()
        greedy.voidcmd("TYPE I")
        for absurd in (f"MRNG 0 {2**63}", "MRNG 0 " + "9" * 40, "MRNG 5 4", "MRNG -1 4", "MRNG 1"):
            with pytest.raises(error_perm, match="501"):
                greedy.sendcmd(absurd)
        greedy.sock.sendall(b"MRNG 0 0\r\n" * (MAX_RANGES - 1))
        assert all(greedy.getresp().startswith("350") for _ in range(MAX_RANGES - 1))
        with pytest.raises(error_perm, match="552"):
            greedy.sendcmd("MRNG 0 0 0 0")  # one line, two ranges: one too many, none added
        greedy.sendcmd("MRNG 0 0")
        with pytest.raises(error_perm, match="552"):
            greedy.sendcmd("MRNG 0 0")
        manifest = Manifest.load(tiny_dataset / "manifest.json")
        blocks = coalesced_blocks(manifest)
        other = fetch_fragments([url], 0, blocks, FetchStats())
        shard = (tiny_dataset / blocks[0].shard).read_bytes()
        assert other == {b.id: shard[b.offset : b.offset + b.length] for b in blocks}
        received = io.BytesIO()
        greedy.retrbinary(f"RETR {blocks[0].shard}", received.write)
        assert received.getvalue() == shard[:1] * MAX_RANGES
        assert greedy.sendcmd("MRNG 0 0").startswith("350 Ranges 1 to 1 ")  # RETR cleared them
    finally:
        greedy.close()
