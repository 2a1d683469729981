"""Local-set chunk policies: source images per class, bytes per node job and held-out accuracy.

For each policy a short synchronous federated run is simulated in this process, as the node jobs
and the aggregation would do it: every node draws its local sets (node_payload.sampling), fetches
them over FTP from two embedded mirrors of the prepared dataset (node_payload.local_data: the
node's coalesced, verified reads), trains the global model's copy (node_payload.train) and the
round's models are averaged (equal local sets: the weighted mean, server lr 1). The node jobs of
`dagtrain run` cannot take a policy, which is not a config key, so the run is simulated here.

Printed per policy: distinct source images per class in a node's local train set (min and mean
over the run's node jobs), bytes a node job fetches (its manifest download not included: it is
the same for every policy, printed once), fetched / needed (needed: the bytes of the blocks under
the drawn fragments, `Manifest.blocks_under`) and held-out accuracy after the last round (mean
over the seeds).

Datasets: the UIUC texture photographs (25 classes x 40 grey 256 px photos: tile 64, overlap 0.5,
angles 0:360:5, holdout 0.3) and the procedural demo's textures (6 classes x 8 images of 1000 px,
the demo config's tile, angles and holdout).

Run:  nice -n 5 python benchmarks/bench_sampling.py [--datasets uiuc demo]
          [--policies previous rows adaptive4 adaptive scattered] [--seeds 1] [--work DIR]
"""

import argparse
import copy
import statistics
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

from node_payload.common.manifest import Manifest
from node_payload.common.models import build_model
from node_payload.common.run_config import TrainTable
from node_payload.fetch import FetchStats
from node_payload.local_data import BlockSource, Tensors, load_fragments
from node_payload.sampling import (
    ChunkPolicy,
    heldout_set,
    local_sets,
    node_seed,
    sources_per_class,
)
from node_payload.train import Schedule, evaluate, train_local
from pipeline.dataset_prepare import prepare
from pipeline.demo import DEMO_CONFIG, demo_textures
from pipeline.mirrors import serve

UIUC = Path("/work/shared/data/uiuc-texture")
POLICIES = ("previous", "rows", "adaptive4", "adaptive", "scattered")


@dataclass(frozen=True)
class Task:
    """A dataset and the short run that measures it."""

    name: str
    tile: int
    overlap: float
    holdout: float
    angles: str
    local_train: int
    local_test: int
    heldout: int
    nodes: int
    rounds: int
    steps: int
    batch: int
    lr: float


DEMO = tomllib.loads(DEMO_CONFIG)
TASKS = {
    "uiuc": Task("uiuc", 64, 0.5, 0.3, "0:360:5", 800, 100, 1000, 4, 8, 40, 32, 0.05),
    "demo": Task(
        "demo",
        DEMO["data"]["tile"],
        DEMO["data"]["overlap"],
        DEMO["data"]["holdout"],
        DEMO["data"]["angles"],
        DEMO["data"]["local_train"],
        DEMO["data"]["local_test"],
        DEMO["data"]["heldout_test"],
        DEMO["run"]["nodes"],
        DEMO["run"]["rounds"],
        DEMO["train"]["local_steps"],
        DEMO["train"]["batch_size"],
        DEMO["train"]["lr"],
    ),
}


def policies(manifest: Manifest) -> dict[str, tuple[str, ChunkPolicy]]:
    """The previous default, whole position rows, the adaptive policy (with 1 and 4 positions a
    chunk at least) and fully scattered fragments, by short name."""
    row = statistics.median_low(s.nx for s in manifest.sources)
    return {
        "previous": ("chunks of 64 (previous)", ChunkPolicy(sources=0, min_chunk=64, shape="run")),
        "rows": (f"whole rows ({row})", ChunkPolicy(sources=0, min_chunk=row, shape="run")),
        "adaptive4": ("adaptive 16, patch >= 4", ChunkPolicy(min_chunk=4)),
        "adaptive": ("adaptive 16 (default)", ChunkPolicy()),
        "scattered": ("scattered (reference)", ChunkPolicy(sources=0, shape="scatter")),
    }


def dataset(task: Task, work: Path) -> Path:
    source = UIUC if task.name == "uiuc" else demo_textures(work / "demo")
    out = work / f"{task.name}.prepared"
    prepare(
        source,
        out,
        tile=task.tile,
        overlap=task.overlap,
        holdout=task.holdout,
        seed=1,
        angles=task.angles,
        progress=False,
        workers=1,
    )
    return out


@dataclass
class Tally:
    spans_min: list[int]
    spans_mean: list[float]
    fetched: list[int]
    needed: list[int]
    accuracy: list[float]


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of equally weighted local models; integer counters from the first."""
    return {
        name: torch.stack([s[name] for s in states]).mean(0) if first.is_floating_point() else first
        for name, first in states[0].items()
    }


def federated_run(
    task: Task,
    manifest: Manifest,
    urls: list[str],
    heldout: Tensors,
    policy: ChunkPolicy,
    seed: int,
    tally: Tally,
) -> None:
    """One run's figures, added to the tally."""
    channels = 1 if manifest.mode == "L" else 3
    model = build_model("smallcnn", len(manifest.classes), channels, seed=seed)
    schedule = Schedule.for_run(TrainTable(lr=task.lr), task.steps, task.rounds)
    for round_ in range(task.rounds):
        states = []
        for node in range(task.nodes):
            node_rng = node_seed(seed, round_, node)
            train, test = local_sets(manifest, node_rng, task.local_train, task.local_test, policy)
            spans = sources_per_class(manifest, train)
            stats = FetchStats()
            data = load_fragments(
                manifest, train + test, BlockSource(urls, node, stats), manifest.tile
            )
            tally.spans_min.append(spans["min"])
            tally.spans_mean.append(spans["mean"])
            tally.fetched.append(stats.bytes_downloaded)
            tally.needed.append(sum(b.length for b in manifest.blocks_under(train + test)))
            local = copy.deepcopy(model)
            train_local(
                local,
                data.x[: len(train)],
                data.y[: len(train)],
                steps=task.steps,
                batch_size=task.batch,
                schedule=schedule,
                first_step=round_ * task.steps,
                momentum=0.9,
                nesterov=False,
                weight_decay=5e-4,
                augment=True,
                seed=node_rng,
            )
            states.append(local.state_dict())
        model.load_state_dict(average(states))
    tally.accuracy.append(evaluate(model, heldout.x, heldout.y)[1])


def measure(task: Task, work: Path, seeds: int, chosen: list[str]) -> None:
    dataset_dir = dataset(task, work)
    manifest = Manifest.load(dataset_dir / "manifest.json")
    train_sources = min(
        sum(1 for s in manifest.sources if s.label == c and not s.holdout)
        for c in range(len(manifest.classes))
    )
    print(
        f"\n{task.name}: {len(manifest.classes)} classes, {train_sources} non-holdout images a "
        f"class; local_train {task.local_train} ({task.local_train // len(manifest.classes)} a "
        f"class), local_test {task.local_test}; {task.nodes} nodes x {task.rounds} rounds x "
        f"{task.steps} steps of {task.batch}; {seeds} seed(s); a node's manifest download: "
        f"{len(manifest.to_bytes()) / 1e3:.0f} kB",
        flush=True,
    )
    print(
        f"{'policy':26} {'sources/class min':>17} {'mean':>5} {'kB/job':>7} "
        f"{'fetched/needed':>14} {'accuracy':>8} {'s':>5}"
    )
    with serve(dataset_dir, k=2) as mirrors:
        ids = heldout_set(manifest, task.heldout, 1)
        heldout = load_fragments(
            manifest, ids, BlockSource(mirrors.urls, 0, FetchStats()), manifest.tile
        )
        for name, policy in (policies(manifest)[k] for k in chosen):
            started = time.perf_counter()
            total = Tally([], [], [], [], [])
            for seed in range(1, seeds + 1):
                federated_run(task, manifest, mirrors.urls, heldout, policy, seed, total)
            print(
                f"{name:26} {min(total.spans_min):>17} {statistics.mean(total.spans_mean):>5.1f} "
                f"{statistics.mean(total.fetched) / 1e3:>7.0f} "
                f"{sum(total.fetched) / sum(total.needed):>14.3f} "
                f"{statistics.mean(total.accuracy):>8.3f} {time.perf_counter() - started:>5.0f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(TASKS), default=["uiuc", "demo"])
    parser.add_argument(
        "--policies", nargs="+", choices=POLICIES, default=list(POLICIES), help="which to run"
    )
    parser.add_argument("--seeds", type=int, default=1, help="runs per policy (model and draws)")
    parser.add_argument("--work", type=Path, help="keep prepared datasets here between runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for name in args.datasets:
            measure(TASKS[name], work, args.seeds, args.policies)


if __name__ == "__main__":
    main()
