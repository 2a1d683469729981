"""Fetching against real pyftpdlib servers on loopback, healthy and faulty."""

import io
import logging
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from blake3 import blake3
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.filesystems import AbstractedFS
from pyftpdlib.handlers import FTPHandler

from node_payload import fetch
from node_payload.common.manifest import Block as Fragment
from node_payload.fetch import DataUnreachable, FetchStats, fetch_file, fetch_fragments
from pipeline.mirrors import (
    MirrorServer,
    MultiRangeFTPHandler,
    RangeFTPHandler,
    free_ports,
    read_only_handler,
    serve,
)
from tests.dropping_mirror import DroppingFile

SHARD = "shards/s00000.bin"
OTHER = "shards/s00001.bin"
FRAG = 2000  # bytes per fragment
MANIFEST = b'{"format": "dagtrain-dataset/1"}\n'


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Iterator[None]:
    yield
    assert not [t.name for t in threading.enumerate() if t.name.startswith("ftp-mirror")]


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, list[Fragment]]:
    """Two shards of random bytes cut into contiguous fragments with their BLAKE3 digests."""
    root = tmp_path / "ds"
    (root / "shards").mkdir(parents=True)
    (root / "manifest.json").write_bytes(MANIFEST)
    rng = random.Random(0)
    frags = []
    for shard, count in ((SHARD, 100), (OTHER, 20)):
        data = rng.randbytes(FRAG * count)
        (root / shard).write_bytes(data)
        for i in range(count):
            chunk = data[i * FRAG : (i + 1) * FRAG]
            frags.append(
                Fragment(
                    id=len(frags),
                    shard=shard,
                    offset=i * FRAG,
                    length=FRAG,
                    digest=blake3(chunk).hexdigest(),
                    hash_name="blake3",
                )
            )
    return root, frags


def expected(root: Path, frags: list[Fragment]) -> dict[int, bytes]:
    return {f.id: (root / f.shard).read_bytes()[f.offset : f.offset + f.length] for f in frags}


def dead_url() -> str:
    return f"ftp://127.0.0.1:{free_ports(1)[0]}"


def corrupt_copy(root: Path, dest: Path) -> Path:
    """A copy of the dataset whose shards hold different bytes at the same offsets."""
    shutil.copytree(root, dest)
    for shard in (SHARD, OTHER):
        data = bytearray((dest / shard).read_bytes())
        data[:: FRAG // 2] = bytes(len(data[:: FRAG // 2]))
        (dest / shard).write_bytes(bytes(b ^ 0xFF for b in data))
    return dest


class CountingHandler(FTPHandler):
    """Records every command, to count reads (REST/RETR) the client makes."""

    commands: list[str]

    def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
        self.commands.append(cmd)
        super().pre_process_command(line, cmd, arg)


class StallingHandler(FTPHandler):
    """Accepts RETR and never answers, like a hung mirror."""

    def ftp_RETR(self, file: str) -> None:
        return None


class _CrashingFS(AbstractedFS):
    def open(self, filename: str, mode: str) -> io.FileIO:
        return DroppingFile(filename, self.cmd_channel, first_chunk=1000)


class CrashingHandler(FTPHandler):
    use_sendfile = False  # sendfile would bypass the file object's read()
    abstracted_fs = _CrashingFS


@pytest.fixture
def counting(dataset: tuple[Path, list[Fragment]]) -> Iterator[tuple[str, list[str]]]:
    root, _ = dataset
    commands: list[str] = []
    handler = read_only_handler(root, type("Counting", (CountingHandler,), {"commands": commands}))
    server = MirrorServer(handler)
    yield server.url, commands
    server.close()


def test_contiguous_fragments_are_read_in_one_go(counting, dataset) -> None:
    url, commands = counting
    root, frags = dataset
    stats = FetchStats()
    got = fetch_fragments([url], 0, frags, stats)
    assert got == expected(root, frags)
    assert commands.count("RETR") == 2  # one per shard, for 120 fragments
    assert stats.bytes_downloaded == len(frags) * FRAG
    assert stats.per_mirror_bytes == {url: len(frags) * FRAG}
    assert stats.failovers == 0
    assert commands.count("USER") == 1  # one control connection for every read


def test_fetched_blocks_are_read_only(counting, dataset) -> None:
    """Blocks come as views of the buffer they arrived in, not copies: no user of one can
    change verified bytes, its own or a neighbour's in the same buffer."""
    url, _ = counting
    root, frags = dataset
    got = fetch_fragments([url], 0, frags[:3], FetchStats())
    with pytest.raises(TypeError, match="read-only"):
        got[frags[0].id][0] = 0
    assert got == expected(root, frags[:3])


def test_far_apart_fragments_are_separate_reads(counting, dataset, monkeypatch) -> None:
    monkeypatch.setattr("node_payload.fetch.MAX_GAP", FRAG)
    url, commands = counting
    root, frags = dataset
    wanted = [f for f in frags if f.shard == SHARD][::3]  # gaps of 2 fragments
    stats = FetchStats()
    assert fetch_fragments([url], 0, wanted, stats) == expected(root, wanted)
    assert commands.count("RETR") == len(wanted)
    assert stats.bytes_downloaded == len(wanted) * FRAG


def test_span_limit_splits_reads(counting, dataset, monkeypatch) -> None:
    monkeypatch.setattr("node_payload.fetch.MAX_SPAN", 10 * FRAG)
    url, commands = counting
    root, frags = dataset
    wanted = [f for f in frags if f.shard == SHARD]
    random.Random(1).shuffle(wanted)
    assert fetch_fragments([url], 0, wanted, FetchStats()) == expected(root, wanted)
    assert commands.count("RETR") == 10


def test_refused_mirror_fails_over(dataset) -> None:
    root, frags = dataset
    stats = FetchStats()
    with serve(root, k=1) as good:
        dead = dead_url()
        got = fetch_fragments([dead, *good.urls], 0, frags, stats)
    assert got == expected(root, frags)
    assert stats.failovers >= 1
    assert set(stats.per_mirror_bytes) == set(good.urls)


def test_wrong_bytes_fail_over(dataset, tmp_path) -> None:
    root, frags = dataset
    stats = FetchStats()
    with serve(corrupt_copy(root, tmp_path / "bad"), k=1) as bad, serve(root, k=1) as good:
        got = fetch_fragments([*bad.urls, *good.urls], 0, frags, stats)
        assert got == expected(root, frags)
        assert stats.failovers == 1  # the first shard starts on the bad mirror, the second not
        assert stats.per_mirror_bytes[bad.urls[0]] == 100 * FRAG


def test_stalled_mirror_costs_one_timeout(dataset, monkeypatch) -> None:
    monkeypatch.setattr("node_payload.fetch.MAX_GAP", FRAG)
    monkeypatch.setattr("node_payload.fetch.MAX_SPAN", FRAG)
    root, frags = dataset
    wanted = [f for f in frags if f.shard == SHARD][::3]  # 34 reads, all starting on the stall
    stalled = MirrorServer(read_only_handler(root, StallingHandler))
    stats = FetchStats()
    started = time.monotonic()
    try:
        with serve(root, k=1) as good:
            got = fetch_fragments([stalled.url, *good.urls], 0, wanted, stats, timeout_s=0.5)
    finally:
        stalled.close()
    assert got == expected(root, wanted)
    assert stats.failovers == len(wanted)
    assert time.monotonic() - started < 1.5  # later reads skip the silent mirror


def test_dropped_connection_fails_over(dataset) -> None:
    root, frags = dataset
    crashing = MirrorServer(read_only_handler(root, CrashingHandler))
    stats = FetchStats()
    try:
        with serve(root, k=1) as good:
            got = fetch_fragments([crashing.url, *good.urls], 0, frags, stats, timeout_s=2)
    finally:
        crashing.close()
    assert got == expected(root, frags)
    assert stats.failovers >= 1
    assert 0 < stats.per_mirror_bytes[crashing.url] < len(frags) * FRAG


def test_shards_start_on_different_mirrors(dataset) -> None:
    root, frags = dataset
    stats = FetchStats()
    with serve(root, k=2) as mirrors:
        assert fetch_fragments(mirrors.urls, 1, frags, stats) == expected(root, frags)
    first, second = mirrors.urls
    assert stats.per_mirror_bytes == {second: 100 * FRAG, first: 20 * FRAG}


def test_every_mirror_failing_is_data_unreachable(dataset, tmp_path, caplog) -> None:
    root, frags = dataset
    dead = f"ftp://alice:{quote('s3cr@t:pw', safe='')}@127.0.0.1:{free_ports(1)[0]}"
    caplog.set_level(logging.DEBUG)
    bad_dir = corrupt_copy(root, tmp_path / "bad")
    with serve(bad_dir, k=1) as bad, pytest.raises(DataUnreachable) as err:
        fetch_fragments([dead, *bad.urls], 0, frags, FetchStats())
    message = str(err.value)
    assert SHARD in message
    assert bad.urls[0] in message
    assert dead.replace(":s3cr%40t%3Apw", "") in message
    for text in (message, caplog.text):
        assert "s3cr" not in text


def test_user_and_password_login(dataset) -> None:
    root, frags = dataset
    authorizer = DummyAuthorizer()
    authorizer.add_user("alice", "s3cr@t:pw/x", str(root.parent), perm="elr")
    server = MirrorServer(type("Private", (FTPHandler,), {"authorizer": authorizer}))
    url = f"ftp://alice:{quote('s3cr@t:pw/x', safe='')}@127.0.0.1:{server.port}/{root.name}"
    stats = FetchStats()
    try:
        got = fetch_fragments([url], 0, frags[:3], stats)
        manifest = fetch_file([url], 0, "manifest.json", stats)
    finally:
        server.close()
    assert got == expected(root, frags[:3])
    assert manifest == MANIFEST
    assert list(stats.per_mirror_bytes) == [f"ftp://alice@127.0.0.1:{server.port}/{root.name}"]


def test_fetch_file_fails_over_and_reports_missing_files(dataset) -> None:
    root, _ = dataset
    stats = FetchStats()
    with serve(root, k=2) as mirrors:
        urls = [dead_url(), *mirrors.urls]
        assert fetch_file(urls, 0, "manifest.json", stats) == MANIFEST
        assert stats.failovers == 1
        assert stats.bytes_downloaded == len(MANIFEST)
        with pytest.raises(DataUnreachable, match=r"missing\.json"):
            fetch_file(mirrors.urls, 1, "missing.json", stats)


def test_small_gaps_are_read_through_within_the_waste_bound(counting, dataset) -> None:
    url, commands = counting
    root, frags = dataset
    sparse = [f for f in frags if f.shard == SHARD and f.offset // FRAG % 20 != 19]
    stats = FetchStats()
    assert fetch_fragments([url], 0, sparse, stats) == expected(root, sparse)
    assert commands.count("RETR") == 1  # a 1-in-20 gap costs 5%: cheaper than a new read
    assert stats.bytes_downloaded == 99 * FRAG  # 95 needed, 4 gaps read through
    dense_gaps = [f for f in frags if f.shard == SHARD][::2]  # 50 needed, 49 gaps of one
    allowance = int(fetch.MAX_WASTE * len(dense_gaps))  # gaps' worth of bytes to read through
    commands.clear()
    stats = FetchStats()
    assert fetch_fragments([url], 0, dense_gaps, stats) == expected(root, dense_gaps)
    assert stats.bytes_downloaded == (len(dense_gaps) + allowance) * FRAG
    assert commands.count("RETR") == len(dense_gaps) - allowance


def test_the_smallest_gaps_are_read_through_first(counting, dataset, monkeypatch) -> None:
    """Gaps of 3, 1, 2 and 1 fragments between five needed ones, with room for 2 fragments of
    gap: both one-fragment gaps are read through, whatever their place."""
    monkeypatch.setattr("node_payload.fetch.MAX_WASTE", 2 / 5)
    url, commands = counting
    root, frags = dataset
    shard = [f for f in frags if f.shard == SHARD]
    wanted = [shard[i] for i in (0, 4, 6, 9, 11)]
    stats = FetchStats()
    assert fetch_fragments([url], 0, wanted, stats) == expected(root, wanted)
    assert commands.count("RETR") == 3  # 0 | 4-6 | 9-11
    assert stats.bytes_downloaded == 7 * FRAG


def sending_handler(base: type[FTPHandler], sent: list[int]) -> type[FTPHandler]:
    """base, with the bytes its data channels handed to the network added to sent[0]."""
    dtp = base.dtp_handler

    class CountingDTP(dtp):
        def close(self) -> None:
            if not self._closed:
                sent[0] += self.tot_bytes_sent
            super().close()

    return type(f"Sending{base.__name__}", (base,), {"dtp_handler": CountingDTP})


def test_plain_server_range_reads_stop_at_the_range_end(counting, dataset, monkeypatch) -> None:
    monkeypatch.setattr("node_payload.fetch.MAX_GAP", FRAG)
    url, commands = counting  # a plain pyftpdlib server: no RANG in its FEAT
    root, frags = dataset
    wanted = [f for f in frags if f.shard == SHARD][5::7]
    stats = FetchStats()
    assert fetch_fragments([url], 0, wanted, stats) == expected(root, wanted)
    assert "RANG" not in commands
    assert commands.count("REST") == commands.count("RETR") == len(wanted)
    assert commands.count("USER") == 1  # every early close left the session in step
    assert stats.bytes_downloaded == len(wanted) * FRAG


def test_ranged_mirror_sends_only_the_ranges(dataset, monkeypatch) -> None:
    monkeypatch.setattr("node_payload.fetch.MAX_GAP", FRAG)
    root, frags = dataset
    sent = [0]
    commands: list[str] = []
    base = type("Counting", (CountingHandler, RangeFTPHandler), {"commands": commands})
    server = MirrorServer(read_only_handler(root, sending_handler(base, sent)))
    wanted = [f for f in frags if f.shard == SHARD][5::7]
    try:
        assert fetch_fragments([server.url], 0, wanted, FetchStats()) == expected(root, wanted)
    finally:
        server.close()
    assert commands.count("RANG") == commands.count("RETR") == len(wanted)
    assert "REST" not in commands
    assert sent[0] == len(wanted) * FRAG


def multi_range_mirror(
    root: Path, commands: list[str], sent: list[int], **attrs: object
) -> MirrorServer:
    """A multi-range mirror recording its commands and the bytes it sent (attrs: class fields)."""
    base = type(
        "Counting", (CountingHandler, MultiRangeFTPHandler), {"commands": commands, **attrs}
    )
    return MirrorServer(read_only_handler(root, sending_handler(base, sent)))


def test_multi_range_mirror_sends_each_shards_ranges_in_one_transfer(dataset) -> None:
    root, frags = dataset
    commands: list[str] = []
    sent = [0]
    server = multi_range_mirror(root, commands, sent)
    wanted = [f for f in frags if f.offset // FRAG % 7 in (1, 2, 5)]  # runs of 2 and of 1
    stats = FetchStats()
    try:
        assert fetch_fragments([server.url], 0, wanted, stats) == expected(root, wanted)
    finally:
        server.close()
    assert commands.count("RETR") == commands.count("MRNG") == 2  # one per shard: 29 and 6 ranges
    assert "REST" not in commands and "RANG" not in commands
    assert commands.count("USER") == 1
    assert stats.bytes_downloaded == sent[0] == len(wanted) * FRAG  # no gap read through


def test_multi_range_reads_are_bounded_in_ranges_and_bytes(dataset, monkeypatch) -> None:
    root, frags = dataset
    wanted = [f for f in frags if f.shard == SHARD][::2]  # 50 ranges of one fragment
    commands: list[str] = []
    server = multi_range_mirror(root, commands, [0])
    try:
        assert fetch_fragments([server.url], 0, wanted, FetchStats()) == expected(root, wanted)
        assert commands.count("RETR") == 1 and commands.count("MRNG") == 2  # 32 + 18 ranges
        commands.clear()
        monkeypatch.setattr("node_payload.fetch.MAX_RANGES", 8)
        assert fetch_fragments([server.url], 0, wanted, FetchStats()) == expected(root, wanted)
        assert commands.count("RETR") == 7  # 6 reads of 8 ranges, 1 of 2
        commands.clear()
        monkeypatch.setattr("node_payload.fetch.MAX_SPAN", 5 * FRAG)
        assert fetch_fragments([server.url], 0, wanted, FetchStats()) == expected(root, wanted)
        assert commands.count("RETR") == 10  # 5 ranges each: MAX_SPAN bounds a read's bytes
    finally:
        server.close()


def test_a_mirror_announcing_fewer_ranges_gets_no_more(dataset) -> None:
    root, frags = dataset
    wanted = [f for f in frags if f.shard == SHARD][::2]
    commands: list[str] = []
    features = ("RANG STREAM", "MRNG 20")
    server = multi_range_mirror(root, commands, [0], features=features)
    try:
        assert fetch_fragments([server.url], 0, wanted, FetchStats()) == expected(root, wanted)
    finally:
        server.close()
    assert commands.count("RETR") == 3  # 20 + 20 + 10 ranges


@pytest.mark.parametrize(
    ("features", "retrs"),
    [
        (("RANG STREAM", "MRNG " + "9" * 5000), 1),  # no limit to speak of: the node's own
        (("RANG STREAM", "MRNG 0"), 45),  # one range per RETR, 5 gaps of 50 read through
        (("MRNG 20",), 45),  # MRNG without RANG STREAM is not believed
    ],
)
def test_what_a_mirror_announces_bounds_its_reads(dataset, features, retrs) -> None:
    root, frags = dataset
    wanted = [f for f in frags if f.shard == SHARD][::2]  # 50 ranges of one fragment
    commands: list[str] = []
    server = multi_range_mirror(root, commands, [0], features=features)
    try:
        assert fetch_fragments([server.url], 0, wanted, FetchStats()) == expected(root, wanted)
    finally:
        server.close()
    assert commands.count("RETR") == retrs


def test_a_multi_range_read_fails_over_to_a_mirror_without_it(counting, dataset, tmp_path):
    """Bad bytes from a multi-range mirror: the read moves to a plain server, which gets the
    same fragments as single-range reads, small gaps read through."""
    plain, commands = counting
    root, frags = dataset
    wanted = [f for f in frags if f.shard == SHARD and f.offset // FRAG % 20 != 19]
    bad_commands: list[str] = []
    bad = multi_range_mirror(corrupt_copy(root, tmp_path / "bad"), bad_commands, [0])
    stats = FetchStats()
    try:
        assert fetch_fragments([bad.url, plain], 0, wanted, stats) == expected(root, wanted)
    finally:
        bad.close()
    assert bad_commands.count("RETR") == bad_commands.count("MRNG") == 1  # 5 ranges
    assert commands.count("RETR") == 1  # one coalesced read: the 4 gaps cost 5%
    assert stats.failovers == 1
    assert stats.per_mirror_bytes == {bad.url: 95 * FRAG, plain: 99 * FRAG}
