"""Several mirrors, some faulty, as real pyftpdlib servers on loopback: spread, failover, backoff,
the plan-time check, and a training round that completes with every fault at once."""

from __future__ import annotations

import io
import json
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pyftpdlib.filesystems import AbstractedFS
from pyftpdlib.handlers import FTPHandler

from node_payload import fetch
from node_payload.common.errors import UserError
from node_payload.common.manifest import Manifest
from node_payload.common.mirror_url import Mirror
from node_payload.fetch import FetchStats, backoff_delay, fetch_fragments
from node_payload.local_data import BlockSource, fetch_blocks, planned_manifest
from node_payload.sampling import local_sets
from pipeline.cli import main
from pipeline.mirror_check import check_mirrors
from pipeline.mirrors import MirrorServer, free_ports, read_only_handler, serve
from tests.dropping_mirror import DroppingFile


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Iterator[None]:
    yield
    assert not [t.name for t in threading.enumerate() if t.name.startswith("ftp-mirror")]


def is_shard(path: str) -> bool:
    return "/shards/" in path.replace("\\", "/")


class StallOnShards(FTPHandler):
    """Serves the manifest, then never answers a shard read: a hung mirror host."""

    def ftp_RETR(self, file: str) -> None:
        if not is_shard(file):
            super().ftp_RETR(file)


class _DroppingFS(AbstractedFS):
    def open(self, filename: str, mode: str) -> io.FileIO:
        if is_shard(filename):
            return DroppingFile(filename, self.cmd_channel, first_chunk=100)
        return super().open(filename, mode)


class DropOnShards(FTPHandler):
    use_sendfile = False  # sendfile would bypass the file object's read()
    abstracted_fs = _DroppingFS


def wrong_bytes_copy(dataset: Path, dest: Path) -> Path:
    """The dataset with the right manifest but every shard byte flipped."""
    shutil.copytree(dataset, dest)
    for shard in (dest / "shards").iterdir():
        shard.write_bytes(bytes(b ^ 0x5A for b in shard.read_bytes()))
    return dest


def dead_url() -> str:
    return f"ftp://127.0.0.1:{free_ports(1)[0]}"


@pytest.fixture
def faulty_mirrors(tiny_dataset: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    """One mirror of each fault and one good one, by name -> URL."""
    wrong = wrong_bytes_copy(tiny_dataset, tmp_path / "wrong")
    servers = {
        "stalls": MirrorServer(read_only_handler(tiny_dataset, StallOnShards)),
        "drops": MirrorServer(read_only_handler(tiny_dataset, DropOnShards)),
        "wrong": MirrorServer(read_only_handler(wrong)),
        "good": MirrorServer(read_only_handler(tiny_dataset)),
    }
    try:
        urls = {name: server.url for name, server in servers.items()}
        urls["stalls"] += "?timeout=0.5"  # a per-mirror timeout keeps the hang short
        yield {"refuses": dead_url(), **urls}
    finally:
        for server in servers.values():
            server.stop()
        for server in servers.values():
            server.close()


def test_eight_nodes_spread_their_reads_over_three_mirrors(tiny_dataset: Path) -> None:
    per_mirror: dict[str, int] = {}
    with serve(tiny_dataset, k=3) as mirrors:
        urls = mirrors.urls
        for node in range(8):
            stats = FetchStats()
            manifest = planned_manifest(urls, node % 3, "", stats)
            train, test = local_sets(manifest, 100 + node, 48, 16)
            fetch_blocks(manifest, train + test, BlockSource(urls, node % 3, stats))
            for url, n in stats.per_mirror_bytes.items():
                per_mirror[url] = per_mirror.get(url, 0) + n
    assert set(per_mirror) == set(urls)
    assert max(per_mirror.values()) / min(per_mirror.values()) <= 1.2


def test_reads_of_a_refusing_mirror_spread_over_the_others(tiny_dataset: Path, monkeypatch) -> None:
    manifest = Manifest.load(tiny_dataset / "manifest.json")
    blocks = {
        b.id: b
        for i in range(0, len(manifest), 7)
        for b in manifest.blocks(manifest.fragment(i))[0]
    }
    stats = FetchStats()
    with serve(tiny_dataset, k=3) as good:
        monkeypatch.setattr(fetch, "MAX_GAP", 0)  # many reads, all starting on the dead mirror
        monkeypatch.setattr(fetch, "MAX_RANGES", 1)  # each its own read, on multi-range mirrors too
        got = fetch_fragments([dead_url(), *good.urls], 0, list(blocks.values()), stats)
    assert set(got) == set(blocks)
    served = [stats.per_mirror_bytes.get(url, 0) for url in good.urls]
    assert min(served) > 0 and max(served) / min(served) < 2  # not all on the neighbour


def test_backoff_is_exponential_jittered_and_bounded() -> None:
    for passed, low, high in ((1, 0.25, 0.5), (2, 0.5, 1.0), (3, 1.0, 2.0)):
        delays = [backoff_delay(passed, 0.5) for _ in range(200)]
        assert low <= min(delays) and max(delays) <= high
        assert len(set(delays)) > 100  # jittered: nodes do not retry in step
    assert max(backoff_delay(30, 0.5) for _ in range(50)) <= fetch.BACKOFF_MAX_S
    assert backoff_delay(2, 0.0) == 0.0


def test_every_mirror_failing_backs_off_between_passes(monkeypatch, tiny_dataset) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(fetch.time, "sleep", pauses.append)
    with pytest.raises(fetch.DataUnreachable):
        fetch.fetch_file([dead_url(), dead_url()], 0, "manifest.json", FetchStats())
    assert len(pauses) == fetch.PASSES - 1
    assert pauses[0] <= fetch.BACKOFF_S < pauses[1] * 2


def test_per_mirror_timeout_parameter() -> None:
    assert Mirror.parse("ftp://h:2121/ds?timeout=2.5").timeout_s == 2.5
    assert Mirror.parse("ftp://h/ds").timeout_s is None
    for bad, message in (("?timeout=0", "timeout must be"), ("?tmo=3", "unknown URL parameter")):
        with pytest.raises(UserError, match=message):
            Mirror.parse("ftp://h/ds" + bad)


def test_faulty_mirrors_fail_over_to_the_good_one(tiny_dataset, faulty_mirrors) -> None:
    urls = list(faulty_mirrors.values())
    manifest = Manifest.load(tiny_dataset / "manifest.json")
    ids = list(range(0, len(manifest), 5))
    for first, fault in enumerate(faulty_mirrors):
        if fault == "good":
            continue
        stats = FetchStats()
        fetch_blocks(manifest, ids, BlockSource(urls, first, stats))
        assert stats.failovers >= 1, fault


def test_plan_warns_about_unreachable_mirrors_and_accepts_wrong_bytes(
    tiny_dataset: Path, faulty_mirrors: dict[str, str], capsys
) -> None:
    digest = Manifest.load(tiny_dataset / "manifest.json").digest()
    check_mirrors(list(faulty_mirrors.values()), digest)
    err = capsys.readouterr().err
    assert faulty_mirrors["refuses"] in err and "unreachable" in err
    for fault in ("stalls", "drops", "wrong", "good"):  # they serve the planned manifest
        assert faulty_mirrors[fault].split("?")[0] not in err


def test_plan_refuses_when_no_mirror_is_reachable(tiny_dataset: Path) -> None:
    digest = Manifest.load(tiny_dataset / "manifest.json").digest()
    with pytest.raises(UserError, match="none of the mirrors is reachable"):
        check_mirrors([dead_url(), dead_url()], digest)


@pytest.mark.slow
def test_round_completes_with_every_fault_and_counts_failovers(
    tiny_config: Callable[..., Path], faulty_mirrors: dict[str, str], tmp_path: Path, capsys
) -> None:
    mirrors = json.dumps(list(faulty_mirrors.values()))
    config = tiny_config(run__rounds="1", data__mirrors=mirrors)
    run_dir = tmp_path / "run"
    assert main(["plan", str(config), "--out", str(run_dir)]) == 0
    assert "unreachable" in capsys.readouterr().err
    assert main(["run", str(run_dir), "--slots", "2"]) == 0

    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed"
    (round_,) = report["rounds"]
    assert round_["nodes_used"] == 3
    nodes = [json.loads(p.read_text()) for p in sorted(run_dir.glob("rounds/r000/n*/metrics.json"))]
    # Nodes 0, 1, 2 start on the refusing, stalling and dropping mirrors; their lanes reach the
    # one serving wrong bytes too: each node failed over.
    assert all(m["mirror_failovers"] >= 1 for m in nodes)
    served: dict[str, int] = {}
    for m in nodes:
        for label, n in m["per_mirror_bytes"].items():
            served[label] = served.get(label, 0) + n
    assert faulty_mirrors["refuses"] not in served
    assert served[faulty_mirrors["wrong"]] > 0  # read, then rejected by the block hashes
    assert served[faulty_mirrors["drops"]] > 0  # the bytes before the connection dropped
    assert served[faulty_mirrors["good"]] > max(
        served[faulty_mirrors[f]] for f in ("wrong", "drops")
    )
    assert round_["mirror_failovers"] == sum(m["mirror_failovers"] for m in nodes)
    assert report["mirror_failovers"] == round_["mirror_failovers"]
