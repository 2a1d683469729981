"""Dataset preparation at microscopy size: throughput and bytes stored per source megapixel.

Generates 2272 x 1704 texture images, prepares them (tile 256, overlap 0.5, angles 0:360:5) as
JPEG blocks and as lossless PNG blocks, and scales the storage to the reference dataset
(654 source images, about 65 GB of stored fragments).

Run:  python benchmarks/bench_prepare.py [IMAGES_PER_CLASS] [WORKERS]
"""

import sys
import tempfile
import time
from pathlib import Path

from pipeline.dataset_prepare import prepare
from pipeline.textures import generate

REFERENCE_IMAGES = 654
REFERENCE_BYTES = 65e9


def main() -> None:
    per_class = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    with tempfile.TemporaryDirectory() as tmp:
        src = generate(
            Path(tmp) / "src", classes=2, images_per_class=per_class, size=2272, height=1704
        )
        megapixels = 2 * per_class * 2272 * 1704 / 1e6
        for lossless in (False, True):
            out = Path(tmp) / f"out-{lossless}"
            started = time.perf_counter()
            manifest = prepare(
                src,
                out,
                tile=256,
                overlap=0.5,
                holdout=0.34,
                angles="0:360:5",
                lossless=lossless,
                workers=workers,
                progress=False,
            )
            seconds = time.perf_counter() - started
            stored = sum(f.bytes for f in manifest.files())
            per_image = stored / len(manifest.sources)
            estimate = per_image * REFERENCE_IMAGES
            manifest_mb = len(manifest.to_bytes()) / 1e6
            print(
                f"{manifest.codec}: {megapixels / seconds:.1f} source MP/s with {workers} workers; "
                f"{stored / megapixels / 1e6:.2f} MB per source MP; {len(manifest)} fragments; "
                f"654 images -> {estimate / 1e9:.2f} GB (+ manifest "
                f"{manifest_mb / len(manifest.sources) * REFERENCE_IMAGES:.1f} MB), "
                f"{REFERENCE_BYTES / estimate:.0f}x smaller than 65 GB"
            )


if __name__ == "__main__":
    main()
