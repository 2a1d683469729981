"""`dagtrain predict`: fragments per second against a bare model loop, and peak memory on a slide.

Rate: one 2272 x 1704 RGB texture image (tile 64, overlap 0.5: 3,640 fragments) classified by
`pipeline.predict` and, side by side in the same process, by a bare `model(batch)` loop over the
same fragments cut and converted to tensors beforehand; the two alternate `--reps` times and the
median ratio is printed (the issue's target: at least 0.8, so tiling and decoding do not dominate).

Memory (`--slide`): a 20,000 x 20,000 grey slide saved as an uncompressed TIFF (memory-mapped
by PIL) and as a PNG (decoded once, 1 byte a pixel), each predicted in a child process, whose
peak resident memory is printed beside that of a child that only loads the model (torch itself).

The model is the run's initial smallcnn (untrained weights cost the same as trained ones).

Run:  nice -n 5 python benchmarks/bench_predict.py [--reps 5] [--slide] [--work DIR]
"""

import argparse
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
from node_payload.batches import to_tensor
from node_payload.common.run_layout import model_path
from pipeline.dataset_prepare import prepare
from pipeline.inference.tiling import bands, check
from pipeline.planner import plan_from_file
from pipeline.textures import generate

CHILD = """
import resource, sys
from pathlib import Path
import pipeline
run = pipeline.load_model(Path(sys.argv[1]))
if len(sys.argv) > 2:
    pipeline.predict(run, [Path(sys.argv[2])], workers=2)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


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


def rate(work: Path, reps: int) -> None:
    run = pipeline.load_model(make_run(work / "rgb", grey=False))
    image = work / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (1704, 2272, 3), np.uint8)).save(image)
    torch.set_num_threads(2)
    pixels = np.concatenate(list(bands(check(image, run.tiling), run.tiling, [0])))
    tensors = [to_tensor(pixels[i : i + 64], run.image_size) for i in range(0, len(pixels), 64)]
    ratios = []
    for _ in range(reps):
        start = time.perf_counter()
        with torch.inference_mode():
            for x in tensors:
                run.model(x).softmax(dim=1)
        bare = len(pixels) / (time.perf_counter() - start)
        start = time.perf_counter()
        pipeline.predict(run, [image], workers=2)
        full = len(pixels) / (time.perf_counter() - start)
        ratios.append(full / bare)
        print(f"{len(pixels)} fragments: bare loop {bare:.0f}/s, predict {full:.0f}/s")
    print(f"predict / bare loop: median {statistics.median(ratios):.2f} over {reps}")


def slide(work: Path) -> None:
    run_dir = make_run(work / "grey", grey=True)
    texture = np.asarray(
        Image.open(next((work / "grey" / "src").rglob("*.png"))).resize((1000, 1000))
    )
    big = Image.fromarray(np.tile(texture, (20, 20)))
    big.save(work / "slide.tif")  # uncompressed: one strip PIL maps instead of reading
    big.save(work / "slide.png", compress_level=1)
    del big
    base = subprocess.run(
        [sys.executable, "-c", CHILD, str(run_dir)], capture_output=True, text=True
    )
    print(f"loading the model alone: peak {base.stdout.strip()} MB")
    for name in ("slide.tif", "slide.png"):
        start = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(run_dir), str(work / name)],
            capture_output=True,
            text=True,
            check=True,
        )
        seconds = time.perf_counter() - start
        print(f"20,000 x 20,000 grey {name}: peak {child.stdout.strip()} MB, {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--slide", action="store_true", help="also the 20,000 px slide (minutes)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_predict."))
    rate(work, args.reps)
    if args.slide:
        slide(work)
    print(f"peak of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")


if __name__ == "__main__":
    main()
