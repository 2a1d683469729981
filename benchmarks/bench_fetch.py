"""A node's fetch at microscopy size, against an embedded FTP mirror on this machine (loopback).

Bytes ratio: bytes downloaded / bytes of the blocks the node's fragments need (what coalescing
wastes on gaps). Throughput ratio: needed bytes fetched and hash-verified per second over the
node's connections (sessions included) / bytes per second of one plain RETR (login included) of a
large file from the same mirror. The two are timed alternately, median of the repeats, because
this machine is shared. Decoding the blocks is timed and reported apart.

Run:  python benchmarks/bench_fetch.py [IMAGES_PER_CLASS] [LOCAL_TRAIN] [REPEATS]
"""

import os
import statistics
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

from node_payload.fetch import FetchStats, fetch_file
from node_payload.fragments import decode
from node_payload.local_data import fetch_raw
from node_payload.manifest import Block
from node_payload.sampling import local_sets
from pipeline.dataset_prepare import prepare
from pipeline.mirrors import serve
from pipeline.textures import generate

LARGE = 256 * 2**20  # the plain RETR reference: large enough that its login is negligible


def _runs(blocks: list[Block]) -> int:
    """Byte-contiguous runs of blocks: the reads an exact coalescing needs on one connection."""
    ordered = sorted(blocks, key=lambda b: (b.shard, b.offset))
    return 1 + sum(
        (a.shard, a.offset + a.length) != (b.shard, b.offset) for a, b in pairwise(ordered)
    )


def main() -> None:
    per_class = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    n_train = int(sys.argv[2]) if len(sys.argv) > 2 else 384
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    n_test = n_train // 4
    with tempfile.TemporaryDirectory() as tmp:
        src = generate(
            Path(tmp) / "src", classes=2, images_per_class=per_class, size=2272, height=1704
        )
        out = Path(tmp) / "out"
        manifest = prepare(
            src, out, tile=256, overlap=0.5, holdout=0.25, angles="0:360:5", progress=False
        )
        (out / "large.bin").write_bytes(os.urandom(LARGE))
        ratios, rates, plain_rates, decode_s, reads = [], [], [], [], []
        with serve(out, k=1) as mirrors:
            urls = mirrors.urls
            for seed in range(repeats):
                started = time.perf_counter()
                fetch_file(urls, 0, "large.bin", FetchStats())
                plain_rates.append(LARGE / (time.perf_counter() - started))
                train, test = local_sets(manifest, seed, n_train, n_test)
                blocks = {
                    b.id: b for i in train + test for b in manifest.blocks(manifest.fragment(i))[0]
                }
                needed = {id_: b.length for id_, b in blocks.items()}
                stats = FetchStats()
                started = time.perf_counter()
                blobs = fetch_raw(manifest, train + test, urls, 0, stats)
                rates.append(sum(needed.values()) / (time.perf_counter() - started))
                ratios.append(stats.bytes_downloaded / sum(needed.values()))
                reads.append(_runs(list(blocks.values())))
                started = time.perf_counter()
                for data in blobs.values():
                    decode(data, manifest.mode)
                decode_s.append(time.perf_counter() - started)
        rate, plain = statistics.median(rates), statistics.median(plain_rates)
        print(
            f"local set {n_train}+{n_test} fragments of {len(manifest.sources)} images, "
            f"{sum(needed.values()) / 1e6:.1f} MB of blocks in {statistics.median(reads)} "
            f"contiguous runs: bytes downloaded / needed {max(ratios):.3f} (worst of {repeats}); "
            f"fetch+verify {rate / 1e6:.0f} MB/s vs plain RETR {plain / 1e6:.0f} MB/s = "
            f"{rate / plain:.2f} (median of {repeats}); decoding {len(blobs)} blocks "
            f"{statistics.median(decode_s):.2f} s"
        )


if __name__ == "__main__":
    main()
