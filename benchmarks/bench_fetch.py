"""A node's fetch at microscopy size, against an FTP mirror in its own process on this machine.

The mirror is `dagtrain serve` in a subprocess, as in a deployment where it is another machine:
it does not share the node's interpreter (GIL) and runs on its own core. Loopback still shares
the machine's 2 cores between both ends and everything else running.

Bytes ratio: bytes downloaded / bytes of the blocks the node's fragments need (what coalescing
wastes on gaps). Throughput ratio: needed bytes fetched and hash-verified per second, fetched as
a node job does (train set, then test set, each with its own sessions, logins included) / bytes
per second of one plain RETR (stdlib ftplib, login included, 1 MiB blocks dropped on arrival) of
a large file from the same mirror: what the mirror and the link can deliver. The ratio is given
without and with the node's manifest download (verified and parsed, never cached on a node).
Reference and node fetch are timed alternately and each pair gives one ratio, median of the
repeats, because this machine is shared. Decoding the blocks is timed and reported apart.

Run:  python benchmarks/bench_fetch.py [IMAGES_PER_CLASS] [LOCAL_TRAIN] [REPEATS]
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ftplib import FTP
from itertools import pairwise
from pathlib import Path
from urllib.parse import urlsplit

from node_payload.fetch import FetchStats
from node_payload.fragments import decode
from node_payload.local_data import fetch_raw, planned_manifest
from node_payload.manifest import Block, Manifest
from node_payload.sampling import local_sets
from pipeline.dataset_prepare import prepare
from pipeline.textures import generate

LARGE = 256 * 2**20  # the plain RETR reference: large enough that its login is negligible
BLOCK = 2**20  # the reference's recv size: large, so that Python's per-call cost stays out of it


@contextmanager
def mirror_process(dataset: Path) -> Iterator[str]:
    """`dagtrain serve` of dataset with one mirror in a subprocess; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", str(dataset), "--mirrors", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("mirrors = "):
                yield json.loads(line.removeprefix("mirrors = "))[0]
                break
        else:
            raise RuntimeError(f"dagtrain serve exited with {proc.wait()} before serving")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait()


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


def _runs(blocks: list[Block]) -> int:
    """Byte-contiguous runs of blocks: the reads an exact coalescing needs on one connection."""
    ordered = sorted(blocks, key=lambda b: (b.shard, b.offset))
    return 1 + sum(
        (a.shard, a.offset + a.length) != (b.shard, b.offset) for a, b in pairwise(ordered)
    )


def main() -> None:
    per_class = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    n_train = int(sys.argv[2]) if len(sys.argv) > 2 else 384
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 7
    n_test = n_train // 4
    with tempfile.TemporaryDirectory() as tmp:
        src = generate(
            Path(tmp) / "src", classes=2, images_per_class=per_class, size=2272, height=1704
        )
        out = Path(tmp) / "out"
        prepare(src, out, tile=256, overlap=0.5, holdout=0.25, angles="0:360:5", progress=False)
        (out / "large.bin").write_bytes(os.urandom(LARGE))
        digest = Manifest.load(out / "manifest.json").digest()
        bytes_ratios, fetch_ratios, node_ratios, rates, plains, decode_s, reads, manifest_s = (
            [] for _ in range(8)
        )
        with mirror_process(out) as url:
            for seed in range(repeats):
                started = time.perf_counter()
                assert plain_retr(url, "large.bin") == LARGE
                plains.append(LARGE / (time.perf_counter() - started))
                manifest_stats, stats = FetchStats(), FetchStats()
                started = time.perf_counter()
                manifest = planned_manifest([url], 0, digest, manifest_stats)
                fetching = time.perf_counter()
                train, test = local_sets(manifest, seed, n_train, n_test)
                blobs = fetch_raw(manifest, train, [url], 0, stats)
                blobs.update(fetch_raw(manifest, test, [url], 0, stats))
                ended = time.perf_counter()
                blocks = manifest.blocks_under(train + test)
                needed = sum(b.length for b in blocks)
                rates.append(needed / (ended - fetching))
                fetch_ratios.append(rates[-1] / plains[-1])
                node_ratios.append(needed / (ended - started) / plains[-1])
                manifest_s.append(fetching - started)
                bytes_ratios.append(stats.bytes_downloaded / needed)
                reads.append(_runs(blocks))
                started = time.perf_counter()
                for data in blobs.values():
                    decode(data, manifest.mode)
                decode_s.append(time.perf_counter() - started)
        print(
            f"local set {n_train}+{n_test} fragments of {len(manifest.sources)} images, "
            f"{needed / 1e6:.1f} MB of blocks in {statistics.median(reads)} contiguous runs: "
            f"bytes downloaded / needed {max(bytes_ratios):.3f} (worst of {repeats})\n"
            f"fetch+verify {statistics.median(rates) / 1e6:.0f} MB/s, plain RETR "
            f"{statistics.median(plains) / 1e6:.0f} MB/s (medians of {repeats}); ratio "
            f"{statistics.median(fetch_ratios):.2f} (median of {repeats} pairs; range "
            f"{min(fetch_ratios):.2f} to {max(fetch_ratios):.2f})\n"
            f"with the manifest ({manifest_stats.bytes_downloaded / 1e6:.2f} MB, "
            f"{statistics.median(manifest_s) * 1e3:.1f} ms to fetch, verify and parse): "
            f"ratio {statistics.median(node_ratios):.2f}\n"
            f"decoding {len(blobs)} blocks {statistics.median(decode_s):.2f} s"
        )


if __name__ == "__main__":
    main()
