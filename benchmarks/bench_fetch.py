"""A node's fetch at microscopy size, against embedded FTP mirrors on this machine.

Bytes ratio: bytes downloaded / bytes of the blocks the node's fragments need (what coalescing
wastes on gaps). Throughput ratio: needed bytes per second of the node's fetch / bytes per second
of one plain RETR of a whole shard from the same mirror.

Run:  python benchmarks/bench_fetch.py [IMAGES_PER_CLASS] [LOCAL_TRAIN]
"""

import sys
import tempfile
import time
from pathlib import Path

from node_payload.fetch import FetchStats, fetch_file
from node_payload.local_data import fetch_blocks
from node_payload.sampling import local_sets
from pipeline.dataset_prepare import prepare
from pipeline.mirrors import serve
from pipeline.textures import generate


def main() -> None:
    per_class = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    n_train = int(sys.argv[2]) if len(sys.argv) > 2 else 384
    with tempfile.TemporaryDirectory() as tmp:
        src = generate(
            Path(tmp) / "src", classes=2, images_per_class=per_class, size=2272, height=1704
        )
        out = Path(tmp) / "out"
        manifest = prepare(
            src, out, tile=256, overlap=0.5, holdout=0.25, angles="0:360:5", progress=False
        )
        with serve(out, k=1) as mirrors:
            urls = mirrors.urls
            largest = max(manifest.files(), key=lambda f: f.bytes)
            plain = FetchStats()
            started = time.perf_counter()
            fetch_file(urls, 0, largest.path, plain)
            plain_rate = largest.bytes / (time.perf_counter() - started)
            ratios, rates = [], []
            for seed in range(3):
                train, test = local_sets(manifest, seed, n_train, n_train // 4)
                ids = train + test
                needed = {
                    b.id: b.length for i in ids for b in manifest.blocks(manifest.fragment(i))[0]
                }
                stats = FetchStats()
                started = time.perf_counter()
                fetch_blocks(manifest, ids, urls, 0, stats)
                seconds = time.perf_counter() - started
                ratios.append(stats.bytes_downloaded / sum(needed.values()))
                rates.append(sum(needed.values()) / seconds)
        print(
            f"local set {n_train}+{n_train // 4} fragments of {len(manifest.sources)} images: "
            f"bytes downloaded / needed {max(ratios):.3f} (worst of 3); fetch throughput "
            f"{min(rates) / 1e6:.1f} MB/s vs plain RETR {plain_rate / 1e6:.1f} MB/s "
            f"= {min(rates) / plain_rate:.2f} (incl. decoding)"
        )


if __name__ == "__main__":
    main()
