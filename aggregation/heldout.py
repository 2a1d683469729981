"""The held-out test set: fragments of source images no node ever trains or tests on, and the
unrotated fragments that vote for each held-out image's class.

Fetched from the mirrors once (like any node's data) and cached in the run directory as
safetensors, so later rounds evaluate on exactly the same tensors without fetching blocks again.
Also the run's coverage: how much of the training data the nodes' local sets have reached.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from aggregation.heldout_cache import Expected, cached
from aggregation.node_metrics import fragment_ids, read_node_metrics
from node_payload.common.manifest import Manifest
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import (
    HELDOUT_CACHE,
    HELDOUT_FILE,
    HELDOUT_IMAGES_CACHE,
    METRICS_FILE,
    node_dir,
)
from node_payload.fetch import FetchStats
from node_payload.local_data import BlockSource, load_fragments, planned_manifest

# Positions that vote for one held-out image: evenly spaced over its grid, whatever its size.
IMAGE_POSITIONS = 16


@dataclass(frozen=True)
class HeldOut:
    """What an evaluation scores a model on."""

    classes: list[str]
    x: torch.Tensor  # the fragments of HELDOUT_FILE
    y: torch.Tensor
    image_x: torch.Tensor  # unrotated fragments, image after image
    image_of: torch.Tensor  # the image (0 ..) each row of image_x belongs to
    image_y: torch.Tensor  # each held-out image's class


def run_manifest(config: RunConfig, first_mirror: int) -> Manifest:
    """The manifest the run was planned with, from its mirrors (tried from `first_mirror`)."""
    data = config.data
    return planned_manifest(data.mirrors, first_mirror, data.manifest_sha256, FetchStats())


def unrotated(angles: list[int]) -> int:
    """Index of the angle closest to 0 degrees (350 is 10 degrees from it), the first on a tie."""
    return min(range(len(angles)), key=lambda i: min(angles[i] % 360, -angles[i] % 360))


def image_fragments(manifest: Manifest) -> tuple[list[int], list[int]]:
    """The fragment ids that vote for the held-out images, and the image of each id (images
    numbered 0 .. in source order).

    Every held-out image votes with its unrotated fragments at IMAGE_POSITIONS (16) of its
    positions, or all of them when it has fewer, evenly spaced over its row-major grid (stepping
    down the rows and across the columns at once), so the work and memory per image stay fixed
    however large it is: 16 tiles, 256 KB as 64 x 64 grey float32 tensors (768 KB in RGB), about
    50 ms of one core per evaluation (smallcnn). On the UIUC textures (300 held-out images of 49 positions,
    25 classes) one model's image accuracy was 0.53 to 0.55 with 4, 8, 16 or 32 positions (its
    fragment accuracy 0.31): the vote settles before 16, and 32 would double the cost for nothing.
    """
    angle, n_angles = unrotated(manifest.angles), len(manifest.angles)
    ids: list[int] = []
    image_of: list[int] = []
    ranges = manifest.by_source()
    held = [s for s, source in enumerate(manifest.sources) if source.holdout]
    for image, s in enumerate(held):
        total = manifest.sources[s].nx * manifest.sources[s].ny
        k = min(IMAGE_POSITIONS, total)
        ids += [ranges[s][(2 * i + 1) * total // (2 * k) * n_angles + angle] for i in range(k)]
        image_of += [image] * k
    return ids, image_of


def load_heldout(
    run_dir: Path, config: RunConfig, manifest: Manifest, first_mirror: int
) -> HeldOut:
    """The held-out tensors, from the caches when they are sound, else fetched and cached."""
    source = BlockSource(list(config.data.mirrors), first_mirror, FetchStats())
    size, channels = config.model.image_size, config.model.in_channels

    def fetch(ids: list[int]) -> dict[str, torch.Tensor]:
        fetched = load_fragments(manifest, ids, source, size)
        return {"x": fetched.x, "y": fetched.y}

    ids = json.loads((run_dir / HELDOUT_FILE).read_text())["fragments"]
    labels = torch.tensor([manifest.fragment(i).label for i in ids], dtype=torch.long)
    fragments = cached(
        run_dir / HELDOUT_CACHE,
        Expected(
            {
                "x": ((len(ids), channels, size, size), torch.float32),
                "y": ((len(ids),), torch.long),
            },
            {"format": "dagtrain-heldout/1"},
            {"y": labels},
        ),
        lambda: fetch(ids),
    )
    image_ids, image_of = image_fragments(manifest)
    digest = hashlib.sha256(json.dumps(image_ids).encode()).hexdigest()
    images = cached(
        run_dir / HELDOUT_IMAGES_CACHE,
        Expected(
            {"x": ((len(image_ids), channels, size, size), torch.float32)},
            {"format": "dagtrain-heldout-images/1", "fragments_sha256": digest},
            {},
        ),
        lambda: {"x": fetch(image_ids)["x"]},
    )
    held = [source.label for source in manifest.sources if source.holdout]
    return HeldOut(
        manifest.classes,
        fragments["x"],
        fragments["y"],
        images["x"],
        torch.tensor(image_of, dtype=torch.long),
        torch.tensor(held, dtype=torch.long),
    )


def training_coverage(run_dir: Path, config: RunConfig, manifest: Manifest, round_: int) -> float:
    """Share of training positions (source image, x, y; any angle) in the union of the local
    training sets of rounds 0..round_, from the ids each node lists in its metrics.json.

    Positions rather than (position, angle) fragments: with 72 angles, fragments are 72 times
    more numerous and mostly differ by a rotation the model also learns from its neighbours.
    """
    # A source's ids are contiguous and its angles adjacent, so are its positions: built from
    # the ends of each range, not from every id (a set of the demo's 400,000 ids took 0.15 s).
    training = {
        position
        for s, ids in manifest.by_source().items()
        if ids and not manifest.sources[s].holdout
        for position in range(manifest.position_of(ids[0]), manifest.position_of(ids[-1]) + 1)
    }
    seen: set[int] = set()
    for r in range(round_ + 1):
        for node in range(config.run.nodes):
            path = node_dir(run_dir, r, node) / METRICS_FILE
            metrics = read_node_metrics(path, f"round {r} node {node}") if path.is_file() else None
            if metrics is not None:
                seen.update(manifest.position_of(i) for i in fragment_ids(metrics))
    seen &= training  # an id a node made up covers nothing
    return len(seen) / len(training)
