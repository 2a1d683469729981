"""The held-out test set: fragments of source images no node ever trains or tests on.

Fetched from the mirrors once (like any node's data) and cached in the run directory as
safetensors, so later rounds evaluate on exactly the same tensors without network traffic.
"""

import json
from pathlib import Path

import torch

from node_payload.fetch import FetchStats
from node_payload.local_data import load_fragments, planned_manifest
from node_payload.run_layout import HELDOUT_FILE
from node_payload.tensor_io import load_tensors, save_tensors

CACHE_FILE = "data/heldout_cache.safetensors"


def heldout_tensors(
    run_dir: Path, config: dict, first_mirror: int
) -> tuple[torch.Tensor, torch.Tensor]:
    cache = run_dir / CACHE_FILE
    if cache.is_file():
        tensors, _ = load_tensors(cache)
        return tensors["x"], tensors["y"]
    data = config["data"]
    planned = json.loads((run_dir / HELDOUT_FILE).read_text())
    mirrors = data["mirrors"]
    stats = FetchStats()
    manifest = planned_manifest(mirrors, first_mirror, data["manifest_sha256"], stats)
    fetched = load_fragments(
        manifest, planned["fragments"], mirrors, first_mirror, config["model"]["image_size"], stats
    )
    save_tensors(cache, {"x": fetched.x, "y": fetched.y}, {"format": "dagtrain-heldout/1"})
    return fetched.x, fetched.y
