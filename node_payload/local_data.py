"""A node's local dataset: the manifest the run was planned with, then its sampled fragments."""

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from node_payload.batches import to_tensor
from node_payload.fetch import DataUnreachable, FetchStats, fetch_file, fetch_fragments
from node_payload.fragments import decode
from node_payload.manifest import Manifest

MANIFEST = "manifest.json"


def planned_manifest(
    mirrors: list[str], first: int, expected_sha256: str, stats: FetchStats
) -> Manifest:
    """Take the manifest from the first mirror whose copy is the one the run was planned with."""
    seen = []
    for step in range(len(mirrors)):
        mirror = mirrors[(first + step) % len(mirrors)]
        try:
            data = fetch_file([mirror], 0, MANIFEST, stats)
        except DataUnreachable as exc:
            seen.append(str(exc))
            stats.failovers += 1
            continue
        if not expected_sha256 or hashlib.sha256(data).hexdigest() == expected_sha256:
            return Manifest.from_bytes(data, f"{MANIFEST} from mirror {step}")
        seen.append(f"mirror {(first + step) % len(mirrors)} serves a different {MANIFEST}")
        stats.failovers += 1
    raise DataUnreachable("no mirror serves the planned dataset: " + "; ".join(seen))


@dataclass(frozen=True)
class Tensors:
    x: torch.Tensor
    y: torch.Tensor


def load_fragments(
    manifest: Manifest,
    ids: list[int],
    mirrors: list[str],
    first: int,
    image_size: int,
    stats: FetchStats,
) -> Tensors:
    """Fetch, verify and decode fragments, in the order of ids so sampling stays reproducible."""
    frags = [manifest.fragments[i] for i in ids]
    blobs = fetch_fragments(mirrors, first, frags, stats)
    images = np.stack([decode(blobs[f.id], manifest.mode) for f in frags])
    labels = torch.tensor([f.label for f in frags], dtype=torch.long)
    return Tensors(to_tensor(images, image_size), labels)
