"""A node's local dataset: the manifest the run was planned with, then its sampled fragments.

A node resolves its fragments to the blocks under their rotation contexts, takes what it can from
an optional node-local cache (desktop-grid machines run many rounds), fetches the rest as
coalesced, verified byte ranges over a few parallel connections, then cuts and rotates locally.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from node_payload.batches import to_tensor
from node_payload.common.manifest import Block, Manifest
from node_payload.fetch import FetchStats, fetch_file, fetch_fragments
from node_payload.fragments import cut, decode

MANIFEST = "manifest.json"
CONNECTIONS = 3  # parallel FTP sessions per node: hides per-read round trips, stays polite


@dataclass(frozen=True)
class BlockSource:
    """Where a node's blocks come from: its mirrors (tried from `first`, which rotates with the
    node and its retries), its optional cache, and the stats that count what fetching cost."""

    mirrors: list[str]
    first: int
    stats: FetchStats
    cache: Path | None = None


def planned_manifest(
    mirrors: list[str], first: int, expected_sha256: str, stats: FetchStats
) -> Manifest:
    """The manifest from the first mirror whose copy is the one the run was planned with; a
    mirror serving another one is named and failed over like any other faulty mirror."""
    data = fetch_file(mirrors, first, MANIFEST, stats, expected_sha256=expected_sha256)
    return Manifest.from_bytes(data, f"{MANIFEST} from the mirrors")


@dataclass(frozen=True)
class Tensors:
    x: torch.Tensor
    y: torch.Tensor


def _cached(cache: Path | None, block: Block) -> bytes | None:
    """The block from the cache (files named by digest), if there and still its bytes."""
    if cache is None:
        return None
    try:
        data = (cache / block.digest).read_bytes()
    except OSError:
        return None
    return data if block.matches(data) else None


def _store(cache: Path, blobs: dict[int, bytes], blocks: dict[int, Block]) -> None:
    """Write verified blocks by hash; a rename makes each file appear complete or not at all."""
    cache.mkdir(parents=True, exist_ok=True)
    for id_, data in blobs.items():
        tmp = cache / f".{blocks[id_].digest}.{os.getpid()}"
        tmp.write_bytes(data)
        tmp.replace(cache / blocks[id_].digest)


def _lanes(blocks: list[Block]) -> list[list[Block]]:
    """Blocks in shard order cut into up to CONNECTIONS consecutive lanes of about equal bytes:
    neighbouring blocks stay in one read within a lane, and the lanes finish together."""
    ordered = sorted(blocks, key=lambda b: (b.shard, b.offset))
    share = sum(b.length for b in ordered) / CONNECTIONS
    lanes: list[list[Block]] = [[]]
    done = 0
    for block in ordered:
        if lanes[-1] and done >= share * len(lanes):
            lanes.append([])
        lanes[-1].append(block)
        done += block.length
    return lanes


def _fetch_parallel(source: BlockSource, blocks: list[Block]) -> dict[int, bytes]:
    """Each lane over its own sessions and stats, merged into the source's stats at the end."""
    mirrors, first, stats = source.mirrors, source.first, source.stats
    lanes = _lanes(blocks)
    lane_stats = [FetchStats() for _ in lanes]
    out: dict[int, bytes] = {}
    with ThreadPoolExecutor(len(lanes)) as pool:
        jobs = [
            pool.submit(fetch_fragments, mirrors, first + k, lane, lane_stats[k])
            for k, lane in enumerate(lanes)
        ]
        for job in jobs:
            out.update(job.result())
    for part in lane_stats:
        stats.bytes_downloaded += part.bytes_downloaded
        stats.failovers += part.failovers
        stats.seconds = max(stats.seconds, part.seconds)
        for mirror, n in part.per_mirror_bytes.items():
            stats.per_mirror_bytes[mirror] = stats.per_mirror_bytes.get(mirror, 0) + n
    return out


def fetch_raw(manifest: Manifest, ids: list[int], source: BlockSource) -> dict[int, bytes]:
    """Verified encoded bytes (by block id) of the blocks under the given fragments' contexts."""
    needed = {block.id: block for block in manifest.blocks_under(ids)}
    blobs: dict[int, bytes] = {}
    for id_, block in needed.items():
        data = _cached(source.cache, block)
        if data is not None:
            blobs[id_] = data
    missing = [block for id_, block in sorted(needed.items()) if id_ not in blobs]
    fetched = _fetch_parallel(source, missing) if missing else {}
    if source.cache is not None:
        _store(source.cache, fetched, needed)
    blobs.update(fetched)
    return blobs


def fetch_blocks(manifest: Manifest, ids: list[int], source: BlockSource) -> dict[int, np.ndarray]:
    """Decoded blocks (by block id) under the contexts of the given fragments."""
    blobs = fetch_raw(manifest, ids, source)
    return {id_: decode(data, manifest.mode) for id_, data in blobs.items()}


def load_fragments(
    manifest: Manifest, ids: list[int], source: BlockSource, image_size: int
) -> Tensors:
    """Fetch, verify, cut and rotate fragments, in the order of ids (sampling stays reproducible)."""
    blocks = fetch_blocks(manifest, ids, source)
    frags = [manifest.fragment(i) for i in ids]
    images = np.stack([cut(manifest, f, blocks) for f in frags])
    labels = torch.tensor([f.label for f in frags], dtype=torch.long)
    return Tensors(to_tensor(images, image_size), labels)
