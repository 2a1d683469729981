"""A node's fetch at microscopy size, against an FTP mirror in its own process on this machine.

The mirror is `dagtrain serve` in a subprocess, as in a deployment where it is another machine:
it does not share the node's interpreter (GIL) and runs on its own core. Loopback still shares
the machine's 2 cores between both ends and everything else running.

Bytes ratio: bytes downloaded / bytes of the blocks the node's fragments need (what coalescing
reads through in gaps). Throughput ratio: needed bytes fetched and hash-verified per second,
fetched as a node job does (train and test set in one fetch, sessions and logins included;
bytes read through in gaps count as time, not as bytes) / bytes per second of one plain RETR
(stdlib ftplib, login included, 1 MiB blocks dropped on arrival) of a file of exactly as many
bytes as the node needs, from the same mirror: the same bytes, moved the simplest way. A plain
RETR of a 256 MiB file is timed beside it as what the mirror and the link deliver at length
(it amortises a login and TCP's start over 60 times the bytes, which a node cannot). The ratio
is given without and with the node's manifest download (verified and parsed, never cached on a
node). References and node fetch are timed alternately and each repeat gives one ratio, median
of the repeats, because this machine is shared. Decoding the blocks is timed and reported apart.
Each timed transfer starts after a full garbage collection (gc.collect): with torch imported, as
in a node job, one takes some 200 ms, and would otherwise fall in whichever transfer crosses the
collector's threshold, most often the node's fetch, which parses a manifest first (`--no-collect`
leaves the collector to itself). The full collections that fall in the node's fetches are counted
and timed.

The node reads each shard's needed ranges of a lane in one transfer (PASV, MRNG lines of up to
32 ranges and RETR in one write; pipeline/mirrors.py). Side by side with it (BLAKE3, format
dagtrain-dataset/3), each repeat fetches the same blocks in other ways, each against the same
repeat's reference, in an order that rotates: one range per RETR, as from a mirror without MRNG
(the mirror's MRNG hidden from the node: PASV, RANG and RETR per read, small gaps read through);
in multi-range reads of up to 1024 ranges and 32 MiB instead of fetch.MAX_RANGES and MAX_SPAN
(fewer reads, each a data connection that starts from TCP's initial window); under a format-2
twin of the manifest (the same shards, every block's sha256 prefix); and over 1, 2 and 6
connections instead of CONNECTIONS. Hashing alone is
timed apart: each hash over the node's blocks, one core. A node without SHA extensions (most
execute-node Xeons before 2021) is emulated with OPENSSL_ia32cap=:~0x20000000 in the
environment, which turns them off for hashlib's sha256.

By default the link is unshaped loopback, where a read's fixed costs weigh most: every read is
a PASV + ranges + RETR, a data connection and a transfer reply, each through the mirror's event
loop, on this machine's 2 shared cores. `--link RATE` (a tc rate: 1gbit,
100mbit) emulates a campus LAN instead: the script re-executes itself in a private network
namespace (`unshare -n`, needs root), where only its own mirror and client run, and shapes that
namespace's loopback with token bucket filters (tc tbf) to RATE. A real link is full duplex, but
loopback has one queue for both directions: packets of 1 KB and more (data) go through one
bucket, smaller ones (ACKs, commands, replies, either way) through another, so that ACKs and
commands do not wait behind data in flight (replies to the node skip the data's queue too).
Bandwidth only: no propagation delay is added (this kernel has no netem).

Run:  python benchmarks/bench_fetch.py [IMAGES_PER_CLASS] [LOCAL_TRAIN] [REPEATS] [--link RATE]
          [--no-collect]
"""

import argparse
import gc
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from ftplib import FTP
from itertools import pairwise
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

from node_payload import fetch, local_data
from node_payload.common.block_hash import BLAKE3, SHA256, hex_digest_function
from node_payload.common.manifest import FORMAT_SHA256, HASH_HEX, Block, Manifest, encode
from node_payload.fetch import FetchStats, _batches, _coalesce, _RangeFTP
from node_payload.fragments import decode
from node_payload.local_data import CONNECTIONS, BlockSource, _lanes, fetch_raw, planned_manifest
from node_payload.sampling import local_sets
from pipeline.dataset_prepare import prepare
from pipeline.textures import generate

LARGE = 256 * 2**20  # what the mirror and link deliver: large enough that its login is negligible
SAME = "same.bin"  # the reference: as many bytes as the node needs, one file, one RETR
VARIANTS = {  # the node's fetch of the same blocks in other ways, timed in the same repeats
    "ranges": "one range per RETR (MRNG hidden, as from a mirror without it: gaps read through)",
    "long": "multi-range reads of up to 1024 ranges and 32 MiB (a lane's part of a shard)",
    "sha256": "the same blocks under the format-2 manifest (sha256)",
    "lanes1": "over 1 connection",
    "lanes2": "over 2 connections",
    "lanes6": "over 6 connections",
}
BLOCK = 2**20  # the reference's recv size: large, so that Python's per-call cost stays out of it
IN_NETNS = "BENCH_FETCH_IN_NETNS"  # "OUTER_NETNS RATE" once re-executed in a namespace of its own
LO_PACKET = 65536 + 14  # the largest frame loopback hands to its qdisc (MTU 65536, GSO included)
# a tc filter for IPv4 packets of a total length under 1024 bytes: ACKs, commands, replies
SMALL = ["u32", "match", "u16", "0x0000", "0xfc00", "at", "2", "flowid", "1:10"]
UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def link_rate(text: str) -> int:
    """A tc rate such as 1gbit or 100mbit, in bits per second."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a rate like 1gbit or 100mbit")
    return int(float(match[1]) * UNITS[match[2]])


def tbf_params(rate_bps: int) -> tuple[int, float]:
    """Burst (bytes) and latency (seconds) of the token bucket that shapes loopback to rate_bps.

    Burst: a real link has no bucket: it serializes at its rate. A full bucket lets `burst`
    bytes through above the rate after every idle period, a head start worth 10% of a small local
    set's 4 MB at 500 kB, so the bucket is kept as small as shaping allows: the tokens of one
    timer period at the rate (tc-tbf(8): rate / HZ, or the bucket overflows between timer ticks
    and the link runs below its rate; with high-resolution timers the period is the timer's
    resolution, nanoseconds), and never less than two of the largest loopback frames (a frame
    larger than the bucket is cut up or dropped). The plain RETR shows whether the link still
    delivers its rate.
    Latency: how long a frame may wait in the queue, which bounds the queue (tc sets its limit to
    rate * latency + burst) as a switch port's buffer does: 10 ms of traffic, and room for at least
    4 of the largest frames (3 data connections plus control traffic) so that slow rates do not
    drop every other frame. Small packets (ACKs, commands) have a bucket of their own, with the
    same parameters.
    """
    tick = time.clock_getres(time.CLOCK_MONOTONIC)  # 1 ns with high-resolution timers, else 1/HZ
    burst = max(int(rate_bps / 8 * tick), 2 * LO_PACKET)
    latency = max(0.010, 4 * LO_PACKET * 8 / rate_bps)
    return burst, latency


def _fail(message: str) -> NoReturn:
    sys.exit(f"bench_fetch.py --link: {message}")


def enter_shaped_namespace(rate: str) -> None:
    """Re-execute this script in a private network namespace; there, shape its loopback."""
    here = os.readlink("/proc/self/ns/net")
    outer, _, asked = os.environ.get(IN_NETNS, "").partition(" ")
    if asked != rate or outer == here:  # not yet re-executed in a namespace of its own
        missing = [tool for tool in ("unshare", "ip", "tc") if shutil.which(tool) is None]
        if missing:
            _fail(f"needs {', '.join(missing)} (util-linux, iproute2)")
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
        if probe.returncode != 0:
            _fail(
                "cannot create a private network namespace (unshare -n needs root, or "
                f"CAP_SYS_ADMIN): {probe.stderr.strip() or probe.returncode}"
            )
        argv = ["unshare", "-n", "--", sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
        os.execvpe("unshare", argv, {**os.environ, IN_NETNS: f"{here} {rate}"})
    burst, latency = tbf_params(link_rate(rate))
    tbf = ["tbf", "rate", rate, "burst", str(burst), "latency", f"{latency * 1e6:.0f}us"]
    lo = ["tc", "qdisc", "add", "dev", "lo"]
    through = ["htb", "rate", "100gbit", "quantum", str(LO_PACKET)]  # classifies, never shapes
    for command in (
        ["ip", "link", "set", "lo", "up"],
        [*lo, "root", "handle", "1:", "htb", "default", "20"],
        *(
            ["tc", "class", "add", "dev", "lo", "parent", "1:", "classid", f"1:{band}", *through]
            for band in (10, 20)
        ),
        [*lo, "parent", "1:10", *tbf],
        [*lo, "parent", "1:20", *tbf],
        # ACKs, commands and replies, either way, on a bucket of their own
        ["tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", *SMALL],
    ):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            _fail(f"{' '.join(command)} failed: {done.stderr.strip()}")
    print(
        f"link: loopback of a private network namespace, packets of 1 KB and more (data) "
        f"shaped by tc tbf rate {rate} burst {burst} B latency {latency * 1e3:.0f} ms, smaller "
        "ones (ACKs, commands, replies) by a bucket of their own: bandwidth only"
    )


def qdisc_counters() -> str:
    """The data bucket's sent/dropped/overlimits line."""
    shown = subprocess.run(
        ["tc", "-s", "qdisc", "show", "dev", "lo", "parent", "1:20"], capture_output=True, text=True
    ).stdout
    return next((line.strip() for line in shown.splitlines() if "Sent" in line), shown.strip())


@contextmanager
def mirror_process(dataset: Path) -> Iterator[tuple[str, int]]:
    """`dagtrain serve` of dataset with one mirror in a subprocess; yields its URL and pid."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", str(dataset), "--mirrors", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("mirrors = "):
                yield json.loads(line.removeprefix("mirrors = "))[0], proc.pid
                break
        else:
            raise RuntimeError(f"dagtrain serve exited with {proc.wait()} before serving")
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C; ignored when this runs in a background job
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def plain_retr(url: str, path: str) -> int:
    """One plain RETR of path, login included; the bytes received."""
    parts = urlsplit(url)
    received = 0

    def drop(chunk: bytes) -> None:
        nonlocal received
        received += len(chunk)

    with FTP() as ftp:
        ftp.connect(parts.hostname, parts.port)
        ftp.login()
        ftp.retrbinary(f"RETR {path}", drop, blocksize=BLOCK)
    return received


def sha256_twin(manifest: Manifest, root: Path) -> Manifest:
    """The same dataset as format dagtrain-dataset/2 described it: every block's sha256 prefix."""
    doc = json.loads(manifest.to_bytes())
    doc["format"] = FORMAT_SHA256
    del doc["block_hash"]
    for source in doc["sources"]:
        with open(root / doc["shards"][source["shard"]]["path"], "rb") as shard:
            shard.seek(source["offset"])
            source["hashes"] = "".join(
                hashlib.sha256(shard.read(n)).hexdigest()[:HASH_HEX] for n in source["lengths"]
            )
    return Manifest.from_bytes(encode(doc), "the format-2 twin")


@contextmanager
def single_ranges() -> Iterator[None]:
    """The mirror's MRNG hidden from the node: one range per RETR, as from a mirror without it."""
    learn = _RangeFTP.learn_features

    def without_multi_range(ftp: _RangeFTP) -> None:
        learn(ftp)
        ftp.max_ranges = 1

    _RangeFTP.learn_features = without_multi_range
    try:
        yield
    finally:
        _RangeFTP.learn_features = learn


@contextmanager
def long_reads() -> Iterator[None]:
    """Multi-range reads of up to 1024 ranges and 32 MiB: fewer, longer reads of the same blocks,
    each lane's part of a shard in one read."""
    span, most = fetch.MAX_SPAN, fetch.MAX_RANGES
    fetch.MAX_SPAN, fetch.MAX_RANGES = 32 * 2**20, 1024
    try:
        yield
    finally:
        fetch.MAX_SPAN, fetch.MAX_RANGES = span, most


@contextmanager
def connections(n: int) -> Iterator[None]:
    """The node's fetch over n connections (lanes) instead of CONNECTIONS."""
    default = local_data.CONNECTIONS
    local_data.CONNECTIONS = n
    try:
        yield
    finally:
        local_data.CONNECTIONS = default


class FullCollections:
    """Full garbage collections (generation 2) while `counting`, and the seconds they took: with
    torch imported, as in a node job, one walks hundreds of thousands of objects."""

    def __init__(self) -> None:
        self.counting = False
        self.count = 0
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if not self.counting or info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._started


def hash_rate(blobs: list[bytes], name: str) -> float:
    """Bytes per second that the named block hash verifies over blobs, one core."""
    hex_digest = hex_digest_function(name, "bench_fetch.py")
    started = time.perf_counter()
    for data in blobs:
        hex_digest(data)
    return sum(map(len, blobs)) / (time.perf_counter() - started)


def _spread(ratios: list[float]) -> str:
    return (
        f"{statistics.median(ratios):.2f} (median of {len(ratios)}; range "
        f"{min(ratios):.2f} to {max(ratios):.2f})"
    )


def _over(times: list[float], references: list[float]) -> list[float]:
    return [t / r for t, r in zip(times, references, strict=True)]


def _runs(blocks: list[Block]) -> int:
    """Byte-contiguous runs of blocks: the ranges a node asks for when no gap is read through."""
    ordered = sorted(blocks, key=lambda b: (b.shard, b.offset))
    return 1 + sum(
        (a.shard, a.offset + a.length) != (b.shard, b.offset) for a, b in pairwise(ordered)
    )


def node_reads(blocks: list[Block]) -> tuple[int, int]:
    """The reads (data connections) a node makes for blocks: from a mirror with MRNG, one per
    multi-range batch of its lanes; from one without, the batches' coalesced single ranges."""
    batches = [
        [frag for run in ranges for frag in run]
        for lane in _lanes(blocks)
        for reads in _batches(lane, fetch.MAX_RANGES).values()
        for ranges in reads
    ]
    return len(batches), sum(len(groups) for b in batches for groups in _coalesce(b).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("per_class", nargs="?", type=int, default=4, metavar="IMAGES_PER_CLASS")
    parser.add_argument("n_train", nargs="?", type=int, default=384, metavar="LOCAL_TRAIN")
    parser.add_argument("repeats", nargs="?", type=int, default=7, metavar="REPEATS")
    parser.add_argument(
        "--link",
        metavar="RATE",
        help="emulate a link of this rate (tc syntax: 1gbit, 100mbit) in a private network "
        "namespace (needs root); default: unshaped loopback",
    )
    parser.add_argument(
        "--no-collect",
        action="store_true",
        help="no full garbage collection before each timed transfer",
    )
    args = parser.parse_args()
    settle = (lambda: None) if args.no_collect else gc.collect
    if args.link:
        try:
            link_rate(args.link)
        except argparse.ArgumentTypeError as exc:
            parser.error(f"--link: {exc}")
        enter_shaped_namespace(args.link.strip().lower())
    per_class, n_train, repeats = args.per_class, args.n_train, args.repeats
    n_test = n_train // 4
    with tempfile.TemporaryDirectory() as tmp:
        src = generate(
            Path(tmp) / "src", classes=2, images_per_class=per_class, size=2272, height=1704
        )
        out = Path(tmp) / "out"
        prepare(src, out, tile=256, overlap=0.5, holdout=0.25, angles="0:360:5", progress=False)
        (out / "large.bin").write_bytes(os.urandom(LARGE))
        planned = Manifest.load(out / "manifest.json")
        digest, twin = planned.digest(), sha256_twin(planned, out)
        bytes_ratios, fetch_ratios, node_ratios, rates, plains, decode_s, reads, manifest_s = (
            [] for _ in range(8)
        )
        sames, link_ratios, multi_reads, single_reads, single_bytes = [], [], [], [], []
        others: dict[str, tuple[Manifest, Callable[[], AbstractContextManager]]] = {
            "ranges": (planned, single_ranges),
            "long": (planned, long_reads),
            "sha256": (twin, nullcontext),
            "lanes1": (planned, lambda: connections(1)),
            "lanes2": (planned, lambda: connections(2)),
            "lanes6": (planned, lambda: connections(6)),
        }
        other_ratios: dict[str, list[float]] = {name: [] for name in others}
        other_times: dict[str, list[float]] = {name: [] for name in others}
        hash_rates: dict[str, list[float]] = {BLAKE3: [], SHA256: []}
        walls, node_cpu, mirror_cpu = [], [], []
        collections = FullCollections()
        gc.callbacks.append(collections)
        with mirror_process(out) as (url, mirror_pid):
            for seed in range(repeats):
                train, test = local_sets(planned, seed, n_train, n_test)
                blocks = planned.blocks_under(train + test)
                needed = sum(b.length for b in blocks)
                reads.append(_runs(blocks))
                multi, single = node_reads(blocks)
                multi_reads.append(multi)
                single_reads.append(single)
                settle()
                started = time.perf_counter()
                assert plain_retr(url, "large.bin") == LARGE
                plains.append(LARGE / (time.perf_counter() - started))
                (out / SAME).write_bytes(os.urandom(needed))
                settle()
                started = time.perf_counter()
                assert plain_retr(url, SAME) == needed
                sames.append(needed / (time.perf_counter() - started))
                order = ["node", *others]
                turn = seed % len(order)
                for variant in order[turn:] + order[:turn]:
                    settle()
                    if variant in others:
                        manifest, context = others[variant]
                        other_stats = FetchStats()
                        with context():
                            started = time.perf_counter()
                            fetch_raw(manifest, train + test, BlockSource([url], 0, other_stats))
                            ended = time.perf_counter()
                        if variant == "ranges":
                            single_bytes.append(other_stats.bytes_downloaded / needed)
                        other_ratios[variant].append(needed / (ended - started) / sames[-1])
                        other_times[variant].append(ended - started)
                        continue
                    manifest_stats, stats = FetchStats(), FetchStats()
                    started = time.perf_counter()
                    manifest = planned_manifest([url], 0, digest, manifest_stats)
                    assert local_sets(manifest, seed, n_train, n_test) == (train, test)
                    cpu, served = time.process_time(), cpu_seconds(mirror_pid)
                    fetching = time.perf_counter()
                    collections.counting = True
                    blobs = fetch_raw(manifest, train + test, BlockSource([url], 0, stats))
                    collections.counting = False
                    ended = time.perf_counter()
                    node_cpu.append(time.process_time() - cpu)
                    mirror_cpu.append(cpu_seconds(mirror_pid) - served)
                    walls.append(ended - fetching)
                    rates.append(needed / (ended - fetching))
                    fetch_ratios.append(rates[-1] / sames[-1])
                    link_ratios.append(rates[-1] / plains[-1])
                    node_ratios.append(needed / (ended - started) / sames[-1])
                    manifest_s.append(fetching - started)
                    bytes_ratios.append(stats.bytes_downloaded / needed)
                for name, rate in hash_rates.items():
                    rate.append(hash_rate(list(blobs.values()), name))
                started = time.perf_counter()
                for data in blobs.values():
                    decode(data, manifest.mode)
                decode_s.append(time.perf_counter() - started)
        print(
            f"local set {n_train}+{n_test} fragments of {len(manifest.sources)} images, "
            f"{needed / 1e6:.1f} MB of blocks in {statistics.median(reads):.0f} contiguous runs, "
            f"read over {CONNECTIONS} connections in {statistics.median(multi_reads):.0f} "
            f"multi-range reads (one range per RETR: {statistics.median(single_reads):.0f} "
            f"reads); bytes downloaded / needed {max(bytes_ratios):.3f} (one range per RETR "
            f"{max(single_bytes):.3f}; worst of {repeats})\n"
            f"fetch+verify (BLAKE3) {statistics.median(rates) / 1e6:.0f} MB/s of needed bytes, "
            f"plain RETR of as many bytes {statistics.median(sames) / 1e6:.0f} MB/s (medians of "
            f"{repeats}); ratio {_spread(fetch_ratios)}\n"
            f"  against a plain RETR of {LARGE >> 20} MiB ({statistics.median(plains) / 1e6:.0f} "
            f"MB/s, what the mirror and link deliver): ratio {_spread(link_ratios)}\n"
            + "".join(
                f"  {label}: ratio {_spread(other_ratios[name])}; time / the node's in the same "
                f"repeat {_spread(_over(other_times[name], walls))}\n"
                for name, label in VARIANTS.items()
            )
            + f"with the manifest ({manifest_stats.bytes_downloaded / 1e6:.2f} MB, "
            f"{statistics.median(manifest_s) * 1e3:.1f} ms to fetch, verify and parse): "
            f"ratio {statistics.median(node_ratios):.2f}\n"
            f"one fetch: {statistics.median(walls) * 1e3:.0f} ms, of which the node's CPU "
            f"{statistics.median(node_cpu) * 1e3:.0f} ms (all its threads) and the mirror's "
            f"{statistics.mean(mirror_cpu) * 1e3:.0f} ms (medians; the mirror's a mean: /proc "
            f"counts it in ticks of {1e3 / os.sysconf('SC_CLK_TCK'):.0f} ms)\n"
            f"hashing the {len(blobs)} blocks alone (mean {needed / len(blobs) / 1e3:.1f} KB), "
            f"one core: BLAKE3 {statistics.median(hash_rates[BLAKE3]) / 1e9:.2f} GB/s, sha256 "
            f"{statistics.median(hash_rates[SHA256]) / 1e9:.2f} GB/s (medians); BLAKE3 takes "
            f"{statistics.median(rates) / statistics.median(hash_rates[BLAKE3]):.0%} of the "
            f"fetch's time\n"
            f"full garbage collections during the node's fetches: {collections.count} in "
            f"{repeats}, {collections.seconds / max(1, collections.count) * 1e3:.0f} ms each "
            f"({len(gc.get_objects())} objects tracked)\n"
            f"decoding {len(blobs)} blocks {statistics.median(decode_s):.2f} s"
        )
        if args.link:
            configured = link_rate(args.link)
            plain = statistics.median(plains) * 8
            print(
                f"plain RETR {plain / 1e6:.0f} Mbit/s = {plain / configured:.2f} of the "
                f"configured {configured / 1e6:.0f} Mbit/s (payload; range "
                f"{min(plains) * 8 / configured:.2f} to {max(plains) * 8 / configured:.2f}); "
                f"loopback qdisc: {qdisc_counters()}"
            )


if __name__ == "__main__":
    main()
