"""What a node job's checkpoint costs: its bytes, the time to write it and to resume from it,
against the training steps it saves, measured side by side in one process.

For each model (the demo's smallcnn at 64 px, resnet18 at 64 px) a node's training state is
built as a job has it after some steps (momentum buffers included), then written with
`Checkpoints.save` and loaded with `Checkpoints.resume` (every check of a restarted job: its
identity, the tensors' sha256, shapes, dtypes, finiteness), each timed as the median of
`--repeats`; the reference is the median SGD step at the demo's batch size on one thread (a
one-CPU slot). Printed: checkpoint bytes, write and resume in ms and in training steps.

Run:  nice -n 5 python benchmarks/bench_checkpoint.py [--repeats 9] [--models smallcnn resnet18]
"""

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

from node_payload.checkpoint import Checkpoints, JobIdentity, Progress
from node_payload.checkpoint_files import STATE_FILE, TENSORS_FILE
from node_payload.common.models import build_model
from node_payload.sgd import Sgd
from node_payload.train import Sampler

IMAGE, BATCH, SAMPLES, CLASSES = 64, 32, 1024, 6
IDENTITY = JobIdentity("bench", 3, 1, "ab" * 32)


def _median_s(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(arch: str, repeats: int, folder: Path) -> dict[str, float]:
    model = build_model(arch, CLASSES, 3, seed=0)
    optimizer = Sgd(model.parameters(), 0.05, 0.9, True, 5e-4)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(BATCH, 3, IMAGE, IMAGE), torch.arange(BATCH) % CLASSES

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # momentum buffers exist from the first step on, as in a job's checkpoint
    step_s = _median_s(step, repeats)
    at = Progress(step=5)
    Sampler(SAMPLES, BATCH, generator, at)
    checkpoints = Checkpoints(folder, IDENTITY, 1)
    write_s = _median_s(lambda: checkpoints.save(model, optimizer, generator, at), repeats)

    def resume() -> None:
        fresh = Progress()
        with contextlib.redirect_stderr(io.StringIO()):  # its "resumed from" line
            Checkpoints(folder, IDENTITY, 1).resume(model, optimizer, generator, fresh, 10, SAMPLES)
        assert fresh.step == 5

    resume_s = _median_s(resume, repeats)
    size = (folder / TENSORS_FILE).stat().st_size + (folder / STATE_FILE).stat().st_size
    return {"bytes": size, "step_ms": 1e3 * step_s, "write_ms": 1e3 * write_s,
            "resume_ms": 1e3 * resume_s}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--models", nargs="+", default=["smallcnn", "resnet18"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':10} {'bytes':>10} {'step ms':>8} {'write ms':>9} {'resume ms':>10} "
          f"{'write/step':>10} {'resume/step':>11}")  # fmt: skip
    for arch in args.models:
        with tempfile.TemporaryDirectory() as folder:
            m = measure(arch, args.repeats, Path(folder))
        print(f"{arch:10} {m['bytes']:>10,} {m['step_ms']:>8.1f} {m['write_ms']:>9.1f} "
              f"{m['resume_ms']:>10.1f} {m['write_ms'] / m['step_ms']:>10.2f} "
              f"{m['resume_ms'] / m['step_ms']:>11.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
