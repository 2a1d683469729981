"""`dagtrain predict`: fragments per second against a bare model loop, and peak memory on a slide.

Rate: one 2272 x 1704 RGB texture image (tile 64, overlap 0.5: 3,640 fragments) classified by
`pipeline.predict` and, side by side in the same process, by bare `model(batch)` loops over the
same fragments cut and converted to tensors beforehand, of the model and of its inference_copy
(what predict scores with); they alternate `--reps` times and the median ratios are printed (the
target: at least 0.8 of the bare loop, so tiling and decoding do not dominate).

Memory (`--slide FORMAT...`): a 20,000 x 20,000 grey slide saved in each format asked for (tif:
uncompressed, one strip; tif-lzw: LZW strips of 3 rows, as PIL writes them; tif-tiled: deflate
tiles of 256 px, written with tifffile; png; jpeg), each predicted whole in a child process with
`--workers` threads, whose peak resident memory is printed beside that of a child that only
imports torch and of one that only loads the model.

The model is the run's initial smallcnn (untrained weights cost the same as trained ones).

Run:  nice -n 5 python benchmarks/bench_predict.py [--reps 5] [--slide tif tif-lzw ...]
      [--workers 2] [--work DIR]
"""

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import pipeline
from aggregation.heldout_metrics import inference_copy
from node_payload.batches import to_tensor
from node_payload.common.run_layout import model_path
from pipeline.dataset_prepare import prepare
from pipeline.inference.tiling import bands, check
from pipeline.planner import plan_from_file
from pipeline.textures import generate

# The child's own peak: VmHWM belongs to the process's memory map, new at exec (ru_maxrss would
# also count the pages this process had when it forked the child).
CHILD = """
import re, sys
from pathlib import Path
import torch
if len(sys.argv) > 1:
    import pipeline
    run = pipeline.load_model(Path(sys.argv[1]))
if len(sys.argv) > 2:
    pipeline.predict(run, [Path(sys.argv[2])], workers=int(sys.argv[3]))
status = Path("/proc/self/status").read_text()
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) // 1024)
"""
FORMATS = ("tif", "tif-lzw", "tif-tiled", "png", "jpeg")


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def make_run(work: Path, grey: bool) -> Path:
    source = generate(work / "src", classes=3, images_per_class=3, size=192, progress=False)
    if grey:
        for path in source.rglob("*.png"):
            Image.open(path).convert("L").save(path)
    prepare(source, work / "dataset", tile=64, overlap=0.5, holdout=0.34, progress=False)
    (work / "run.toml").write_text(
        f'[run]\nnodes = 2\nrounds = 1\n[data]\ndataset = "{work / "dataset"}"\n'
        "local_train = 32\nlocal_test = 16\nheldout_test = 16\n"
    )
    run_dir = plan_from_file(work / "run.toml", work / "run")
    shutil.copy(model_path(run_dir, 0), model_path(run_dir, 1))
    return run_dir


def rate(work: Path, reps: int, threads: int) -> None:
    run = pipeline.load_model(make_run(work / "rgb", grey=False))
    image = work / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (1704, 2272, 3), np.uint8)).save(image)
    torch.set_num_threads(threads)
    pixels = np.concatenate(list(bands(check(image, run.tiling), run.tiling, [0])))
    tensors = [to_tensor(pixels[i : i + 64], run.image_size) for i in range(0, len(pixels), 64)]
    fast = inference_copy(run.model)
    ratios: dict[str, list[float]] = {"plain": [], "fast": []}
    for _ in range(reps):
        bare = {
            "plain": bare_rate(run.model, tensors, len(pixels)),
            "fast": bare_rate(fast, tensors, len(pixels)),
        }
        start = time.perf_counter()
        pipeline.predict(run, [image], workers=threads)
        full = len(pixels) / (time.perf_counter() - start)
        for kind, value in bare.items():
            ratios[kind].append(full / value)
        print(f"{len(pixels)} fragments: bare loop of the model {bare['plain']:.0f}/s, of its "
              f"inference_copy {bare['fast']:.0f}/s, predict {full:.0f}/s ({load()})")  # fmt: skip
    print(
        f"predict / bare loop of the model: median {statistics.median(ratios['plain']):.2f}; "
        f"/ bare loop of its inference_copy: {statistics.median(ratios['fast']):.2f} over {reps}"
    )


def bare_rate(model: torch.nn.Module, tensors: list[torch.Tensor], fragments: int) -> float:
    """Fragments per second of a bare loop over tensors made beforehand."""
    start = time.perf_counter()
    with torch.inference_mode():
        for x in tensors:
            model(x.contiguous(memory_format=torch.channels_last)).softmax(dim=1)
    return fragments / (time.perf_counter() - start)


def save(pixels: np.ndarray, path: Path, kind: str) -> None:
    if kind == "tif-tiled":
        import tifffile  # the test extra; dagtrain itself reads TIFF with PIL

        tifffile.imwrite(path, pixels, tile=(256, 256), compression="zlib")
        return
    options = {
        "tif": {},
        "tif-lzw": {"compression": "tiff_lzw"},
        "png": {"compress_level": 1},
        "jpeg": {"quality": 90},
    }[kind]
    Image.fromarray(pixels).save(path, **options)


def peak(*args: str) -> str:
    child = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True
    )
    return child.stdout.strip()


def slide(work: Path, formats: list[str], workers: int) -> None:
    run_dir = make_run(work / "grey", grey=True)
    texture = np.asarray(
        Image.open(next((work / "grey" / "src").rglob("*.png"))).resize((1000, 1000))
    )
    pixels = np.tile(texture, (20, 20))
    paths = {kind: work / f"slide-{kind}.{kind.split('-')[0]}" for kind in formats}
    for kind, path in paths.items():
        if not path.exists():
            save(pixels, path, kind)
    del pixels
    print(f"importing torch alone: peak {peak()} MB")
    print(f"loading the model alone: peak {peak(str(run_dir))} MB")
    for kind, path in paths.items():
        start = time.perf_counter()
        used = peak(str(run_dir), str(path), str(workers))
        seconds = time.perf_counter() - start
        print(
            f"20,000 x 20,000 grey {kind} ({path.stat().st_size / 1e6:.0f} MB file), "
            f"--workers {workers}: peak {used} MB, {seconds:.0f} s ({load()})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--slide",
        nargs="+",
        choices=FORMATS,
        default=[],
        help="also the 20,000 px slide in these formats (minutes each)",
    )
    parser.add_argument("--workers", type=int, default=2, help="threads for predict")
    parser.add_argument("--skip-rate", action="store_true", help="only the slide")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_predict."))
    if not args.skip_rate:
        rate(work, args.reps, args.workers)
    if args.slide:
        slide(work, args.slide, args.workers)
    print(f"peak of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")


if __name__ == "__main__":
    main()
