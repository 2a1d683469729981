"""Upper bounds on the sizes a manifest may claim, and the check that holds a manifest to them.

A manifest comes from the user's dataset directory on the submit host and, on the nodes, from
untrusted mirrors (checked against the planned sha256). Every byte count in it turns into a
read and a buffer on the nodes, so a count no real dataset could have (a 1 TB block, 48 TB of
shards) is refused when the manifest is loaded, on the submit host, before anything is planned.
"""

from typing import Any

# The reference dataset (654 images of 2272 x 1704, tile 256) has a 4 MB manifest; 256 MiB
# leaves 64 times that and still bounds what a node reads for a manifest a mirror claims.
MAX_MANIFEST_BYTES = 256 * 2**20
# `dagtrain prepare` makes blocks of 128 px up to 128 px plus a stride (< 128 + tile); 4096 px
# allows tiles near 4000 px and bounds one block's pixels (4096^2 RGB: 48 MiB raw).
MAX_BLOCK = 4096
# The reference dataset takes 1 GB; 4 TiB is 4000 times that, beyond what ordinary FTP mirrors
# hold, and far below the petabytes a lying manifest may claim.
MAX_DATASET_BYTES = 4 * 2**40
# JPEG (quality 90 to 100) and PNG encode a block of noise in at most 1.6 times its raw bytes;
# small blocks add up to a few KiB of headers.
_ENCODED_PER_RAW = 2
_HEADER_BYTES = 64 * 2**10


def max_block_bytes(block: int, mode: str) -> int:
    """The most bytes a `block` x `block` block of the mode's pixels can take encoded."""
    channels = 1 if mode == "L" else 3
    return _ENCODED_PER_RAW * block * block * channels + _HEADER_BYTES


def size_problem(doc: dict[str, Any]) -> str | None:
    """The first byte count of a structurally valid manifest (its block at most MAX_BLOCK) that
    no real dataset could have."""
    block, mode = doc["block"], doc["mode"]
    total = sum(shard["bytes"] for shard in doc["shards"])
    if total > MAX_DATASET_BYTES:
        return (
            f"the shards claim {total} bytes in all, more than the {MAX_DATASET_BYTES} bytes "
            "(4 TiB) a dataset may have"
        )
    most = max_block_bytes(block, mode)
    room = [0] * len(doc["shards"])
    for i, source in enumerate(doc["sources"]):
        biggest = max(source["lengths"])
        if biggest > most:
            k = source["lengths"].index(biggest)
            return (
                f"source {i} ({source['path']!r}): block {k} claims {biggest} bytes, more than a "
                f"{block} x {block} {mode} block can take encoded ({most})"
            )
        room[source["shard"]] += len(source["lengths"]) * most
    for shard, can_hold in zip(doc["shards"], room, strict=True):
        if shard["bytes"] > can_hold:
            return (
                f"shard {shard['path']!r} claims {shard['bytes']} bytes, more than the blocks of "
                f"its sources can take encoded ({can_hold})"
            )
    return None
