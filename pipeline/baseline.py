"""`dagtrain baseline`: the config's model trained centrally, in one process, on the same data.

It answers "is the pool worth it for my data?": the same network and initial weights, held-out
set, augmentation, batch size, optimizer and schedule shape as the run the config plans, trained
by one machine that holds all the data. That machine draws class-balanced fragments uniformly
from every non-holdout source image (random positions and angles) instead of a node's chunks of
a few images, and reads the planner's prepared dataset from local disk, never from the mirrors.

The training pool is drawn once and kept as uint8 pixels (a tile of 64 grey is 4 KB, a float
copy 16 KB); a batch becomes floats only when it is made.
"""

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aggregation.heldout import HeldOut, image_fragments
from aggregation.heldout_metrics import heldout_metrics
from node_payload.batches import augment, to_tensor
from node_payload.common.atomic_file import write_text
from node_payload.common.errors import UserError
from node_payload.common.manifest import Manifest
from node_payload.common.models import build_model
from node_payload.common.run_config import RunConfig
from node_payload.common.threads import torch_threads
from node_payload.fragments import cut, decode
from node_payload.sampling import class_pools, class_quotas
from node_payload.sgd import Sgd
from node_payload.train import Schedule, channels_last, shuffled_batches, steps_for
from pipeline.config import ConfigFile, load
from pipeline.planner import Plan, make_plan

RESULT_FILE = "baseline.json"
PLOT_FILE = "baseline.png"
POOL_BYTES = 512 * 2**20  # pixels of the training pool, at most: bounds memory, not steps
CURVE_POINTS = 8  # held-out evaluations, evenly spaced over the steps
CURVE_KEYS = ("step", "accuracy", "image_accuracy", "loss")


@dataclass(frozen=True)
class Pixels:
    """Fragments as stored in memory: uint8 N x tile x tile x C, and their labels."""

    images: np.ndarray
    labels: np.ndarray


def dataset_plan(source: ConfigFile) -> Plan:
    """The plan's dataset and held-out ids, resolved exactly as `dagtrain plan` resolves them.

    The user's mirrors are left out: checking them is the run's business, and the baseline reads
    the dataset folder the planner prepared, so it works with the mirrors down.
    """
    data = source.config.data
    if data.dataset and not data.source:
        folder = source.path(data.dataset)
        if not (folder / "manifest.json").is_file():
            raise UserError(
                f"{source.origin}: [data] dataset = {data.dataset!r}: no prepared dataset at "
                f"{folder} (no manifest.json); run `dagtrain prepare IMAGES {folder}` first, or "
                "set [data] source to the images"
            )
    local = replace(source, config=source.config.with_values("data", mirrors=()))
    return make_plan(local)


def default_steps(config: RunConfig) -> int:
    """The federated run's total compute: node jobs times each job's steps (as a node derives
    them from local_epochs when local_steps is 0)."""
    train = config.train
    job_steps = steps_for(
        train.local_steps, train.local_epochs, config.data.local_train, train.batch_size
    )
    jobs = config.update_budget if config.is_async else config.run.nodes * config.run.rounds
    return jobs * job_steps


def pool_size(steps: int, batch_size: int, manifest: Manifest) -> int:
    """steps x batch fragments, each seen once, unless their pixels would pass POOL_BYTES."""
    channels = 1 if manifest.mode == "L" else 3
    cap = max(batch_size, POOL_BYTES // (manifest.tile * manifest.tile * channels))
    return min(steps * batch_size, cap)


def training_pool(manifest: Manifest, n: int, seed: int) -> list[int]:
    """n class-balanced fragment ids (sorted), uniform over each class's non-holdout fragments:
    every source, position and angle can be drawn. Distinct while the class has enough."""
    rng = np.random.Generator(np.random.PCG64(_seed(seed)))
    quotas = class_quotas(n, len(manifest.classes), rng)
    chosen: list[int] = []
    for quota, pool in zip(quotas, class_pools(manifest, holdout=False), strict=True):
        ranges = list(pool.values())
        sizes = np.array([len(r) for r in ranges])
        ends = np.cumsum(sizes)
        picks = rng.choice(int(ends[-1]), size=quota, replace=quota > ends[-1])
        which = np.searchsorted(ends, picks, side="right")
        shift = np.array([r.start for r in ranges]) - (ends - sizes)  # pick -> its id
        chosen += (picks + shift[which]).tolist()
    return sorted(chosen)


def _seed(run_seed: int) -> int:
    digest = hashlib.sha256(f"dagtrain-baseline/{run_seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def read_fragments(manifest: Manifest, dataset_dir: Path, ids: list[int]) -> Pixels:
    """Cut the fragments (in the order of ids) from the dataset's shards on local disk, one
    source at a time: only one source's decoded blocks are held at once."""
    channels = 1 if manifest.mode == "L" else 3
    images = np.empty((len(ids), manifest.tile, manifest.tile, channels), np.uint8)
    labels = np.empty(len(ids), np.int64)
    array = np.asarray(ids, np.int64)
    first = np.array([r.start for r in manifest.by_source().values()] + [len(manifest)])
    of_source = np.searchsorted(first, array, side="right") - 1
    for source in np.unique(of_source).tolist():
        rows = np.flatnonzero(of_source == source)
        blocks = _source_blocks(manifest, dataset_dir, array[rows].tolist())
        for row in rows.tolist():
            fragment = manifest.fragment(ids[row])
            images[row] = cut(manifest, fragment, blocks)
            labels[row] = fragment.label
    return Pixels(images, labels)


def _source_blocks(manifest: Manifest, dataset_dir: Path, ids: list[int]) -> dict[int, np.ndarray]:
    """Decoded, verified blocks under the contexts of fragments of one source, in one read."""
    needed = manifest.blocks_under(ids)
    shard = dataset_dir / needed[0].shard
    start, end = needed[0].offset, needed[-1].offset + needed[-1].length
    try:
        with open(shard, "rb") as file:
            file.seek(start)
            span = file.read(end - start)
    except OSError as exc:
        raise UserError(
            f"cannot read {shard}: {exc.strerror}; re-run `dagtrain prepare` to rebuild the dataset"
        ) from None
    out = {}
    for block in needed:
        data = span[block.offset - start : block.offset - start + block.length]
        if not block.matches(data):
            raise UserError(
                f"{shard}: block {block.id} does not match its hash in manifest.json; re-run "
                "`dagtrain prepare` to rebuild the dataset"
            )
        out[block.id] = decode(data, manifest.mode)
    return out


def load_heldout(plan: Plan) -> HeldOut:
    """The run's held-out set from local disk: the planner's fragment ids, and the unrotated
    fragments that vote for each held-out image, exactly as the aggregation scores a round."""
    manifest, size = plan.manifest, plan.config.model.image_size
    fragments = read_fragments(manifest, plan.dataset_dir, plan.heldout)
    image_ids, image_of = image_fragments(manifest)
    votes = read_fragments(manifest, plan.dataset_dir, image_ids)
    held = [source.label for source in manifest.sources if source.holdout]
    return HeldOut(
        manifest.classes,
        to_tensor(fragments.images, size),
        torch.from_numpy(fragments.labels),
        to_tensor(votes.images, size),
        torch.tensor(image_of, dtype=torch.long),
        torch.tensor(held, dtype=torch.long),
    )


def train_central(
    model: nn.Module,
    pool: Pixels,
    config: RunConfig,
    steps: int,
    on_step: Callable[[int, nn.Module], None],
) -> None:
    """SGD over shuffled epochs of the pool, as a node trains (train_local) but with one
    optimizer over all the steps and the schedule stretched over them."""
    train = config.train
    schedule = Schedule.for_run(train, steps, 1)
    generator = torch.Generator().manual_seed(_seed(config.run.seed))
    optimizer = Sgd(
        model.parameters(), schedule.lr(0), train.momentum, train.nesterov, train.weight_decay
    )
    loss_fn = nn.CrossEntropyLoss()
    # the pool holds at least one batch (pool_size)
    batches = shuffled_batches(len(pool.labels), train.batch_size, generator)
    model.train()
    with channels_last(model):
        for step, batch in zip(range(steps), batches, strict=False):
            optimizer.lr = schedule.lr(step)
            index = batch.numpy()
            x = to_tensor(pool.images[index], config.model.image_size)
            inputs = augment(x, generator) if train.augment else x
            loss = loss_fn(model(inputs), torch.from_numpy(pool.labels[index]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            on_step(step + 1, model)


def curve_steps(steps: int) -> list[int]:
    return sorted({max(1, round(steps * k / CURVE_POINTS)) for k in range(1, CURVE_POINTS + 1)})


def run_baseline(
    config_path: Path, out_dir: Path, steps: int | None = None, show_progress: bool = True
) -> dict[str, Any]:
    """Train centrally, write out_dir/baseline.json and baseline.png, and return the result."""
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be a positive number of SGD steps, not {steps}")
    plan = dataset_plan(load(config_path))
    config = plan.config
    steps = steps or default_steps(config)
    _make_out_dir(out_dir)
    started = time.perf_counter()
    with torch_threads(config.resources.request_cpus), _progress(show_progress, steps) as advance:
        size = pool_size(steps, config.train.batch_size, plan.manifest)
        pool_ids = training_pool(plan.manifest, size, config.run.seed)
        pool = read_fragments(plan.manifest, plan.dataset_dir, pool_ids)
        heldout = load_heldout(plan)
        model = initial_model(plan)
        curve: list[dict[str, Any]] = []
        points = set(curve_steps(steps))

        def on_step(step: int, trained: nn.Module) -> None:
            if step in points:
                curve.append({"step": step, **heldout_metrics(trained, heldout)})
                trained.train()
            advance(step)

        train_central(model, pool, config, steps, on_step)
    result = {
        "config": str(config_path),
        "dataset": str(plan.dataset_dir),
        "arch": config.model.arch,
        "steps": steps,
        "batch_size": config.train.batch_size,
        "pool_fragments": len(pool_ids),
        "heldout_fragments": len(plan.heldout),
        "threads": config.resources.request_cpus,
        "seconds": round(time.perf_counter() - started, 2),
        "heldout_loss": curve[-1]["loss"],
        "heldout_accuracy": curve[-1]["accuracy"],
        "heldout_image_accuracy": curve[-1]["image_accuracy"],
        "heldout": curve[-1],  # the last evaluation: recall and confusion matrices too
        "curve": [{k: point[k] for k in CURVE_KEYS} for point in curve],
    }
    write_text(out_dir / RESULT_FILE, json.dumps(result, indent=1) + "\n")
    plot(result, out_dir / PLOT_FILE)
    return result


def initial_model(plan: Plan) -> nn.Module:
    """The run's global model at round 0: the same network and weights the planner writes."""
    model = plan.config.model
    classes = len(plan.manifest.classes)
    return build_model(model.arch, classes, model.in_channels, seed=plan.config.run.seed)


def _make_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--out {out_dir}: not a folder; choose another --out") from None
    except OSError as exc:
        raise UserError(f"--out {out_dir}: cannot create it ({exc.strerror})") from None


@contextlib.contextmanager
def _progress(show: bool, steps: int) -> Iterator[Callable[[int], None]]:
    if not show:
        yield lambda _step: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("baseline: reading the dataset", total=steps)

        def advance(step: int) -> None:
            progress.update(task, completed=step, description="baseline: training")

        yield advance


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(4.5, 3.2), constrained_layout=True)
    curve = result["curve"]
    steps = [point["step"] for point in curve]
    for key, label in (("accuracy", "fragments"), ("image_accuracy", "images")):
        axis.plot(steps, [point[key] for point in curve], marker="o", label=label)
    axis.legend()
    axis.set_xlabel("SGD step")
    axis.set_ylabel("held-out accuracy")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.set_title(f"centralized baseline: {result['arch']}, batch {result['batch_size']}")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(result: dict[str, Any], out_dir: Path) -> str:
    """The one line `dagtrain baseline` prints."""
    return (
        f"baseline: {result['steps']} steps in {result['seconds']:.0f} s "
        f"({result['threads']} thread(s)), held-out accuracy {result['heldout_accuracy']:.3f} "
        f"(images {result['heldout_image_accuracy']:.3f}), loss {result['heldout_loss']:.3f} "
        f"-> {out_dir / RESULT_FILE}"
    )
