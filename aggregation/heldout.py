"""The held-out test set: fragments of source images no node ever trains or tests on.

Fetched from the mirrors once (like any node's data) and cached in the run directory as
safetensors, so later rounds evaluate on exactly the same tensors without network traffic.
Also the run's coverage: how much of the training data the nodes' local sets have reached.
"""

import json
from pathlib import Path

import torch

from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import HELDOUT_FILE, METRICS_FILE, node_dir
from node_payload.common.tensor_io import load_tensors, save_tensors
from node_payload.fetch import FetchStats
from node_payload.local_data import BlockSource, load_fragments, planned_manifest

CACHE_FILE = "data/heldout_cache.safetensors"


def heldout_tensors(
    run_dir: Path, config: RunConfig, first_mirror: int
) -> tuple[torch.Tensor, torch.Tensor]:
    cache = run_dir / CACHE_FILE
    if cache.is_file():
        tensors, _ = load_tensors(cache)
        return tensors["x"], tensors["y"]
    data = config.data
    planned = json.loads((run_dir / HELDOUT_FILE).read_text())
    mirrors = data.mirrors
    stats = FetchStats()
    manifest = planned_manifest(mirrors, first_mirror, data.manifest_sha256, stats)
    source = BlockSource(mirrors, first_mirror, stats)
    fetched = load_fragments(manifest, planned["fragments"], source, config.model.image_size)
    save_tensors(cache, {"x": fetched.x, "y": fetched.y}, {"format": "dagtrain-heldout/1"})
    return fetched.x, fetched.y


def training_coverage(run_dir: Path, config: RunConfig, round_: int, first_mirror: int) -> float:
    """Share of training positions (source image, x, y; any angle) in the union of the local
    training sets of rounds 0..round_, from the ids each node lists in its metrics.json.

    Positions rather than (position, angle) fragments: with 72 angles, fragments are 72 times
    more numerous and mostly differ by a rotation the model also learns from its neighbours.
    """
    data = config.data
    manifest = planned_manifest(data.mirrors, first_mirror, data.manifest_sha256, FetchStats())
    total = sum(
        len(ids) // len(manifest.angles)
        for s, ids in manifest.by_source().items()
        if not manifest.sources[s].holdout
    )
    seen: set[int] = set()
    for r in range(round_ + 1):
        for node in range(config.run.nodes):
            path = node_dir(run_dir, r, node) / METRICS_FILE
            if path.is_file():
                ids = json.loads(path.read_text()).get("train_fragments", [])
                seen.update(manifest.position_of(i) for i in ids)
    return len(seen) / total
