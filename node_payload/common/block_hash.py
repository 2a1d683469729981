"""The hashes a dataset manifest may name for its blocks, and the check of a block's bytes.

A manifest stores a HASH_HEX hex-digit prefix of every block's digest (64 bits: catches
corruption and a mirror's substituted bytes, keeps big manifests small). Datasets of format
"dagtrain-dataset/3" name their hash (`block_hash`); those of "dagtrain-dataset/2" hashed with
sha256, and still load and verify with it.

New datasets use BLAKE3 (the `blake3` package): a node verifies every block it fetches on the
CPU that receives it. For the 4 to 16 KB of a JPEG block, BLAKE3 ran 3 to 13 times faster than
sha256 on a CPU without SHA extensions (like most execute-node Xeons before 2021) and as fast as
sha256 with them (benchmarks/bench_fetch.py). It hashes on one thread whatever the slot grants
(`max_threads` = 1): with 2 threads a 6 KB block took 20 times longer on a 2-core machine (the
package builds a thread pool per hasher), and even 1 MB 1.5 times longer. Like hashlib's, its
hashing releases the GIL for inputs of 2 KB or more, so the fetch lanes verify side by side.

`blake3` is a compiled module that the job payload cannot carry: the Python that runs the jobs
must have it. It is imported when a manifest that names it is loaded, so a node without it fails
once, fatally, with the fix, before fetching anything.
"""

import hashlib
import sys
from collections.abc import Callable

from node_payload.common.errors import UserError

HASH_HEX = 16
SHA256 = "sha256"
BLAKE3 = "blake3"
NAMES = (BLAKE3, SHA256)

HexDigest = Callable[[bytes | bytearray | memoryview], str]


def _sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def hex_digest_function(name: str, origin: str) -> HexDigest:
    """The hex digest of the named block hash; `origin` (the manifest) names it in the error.

    The import is tried on every call, so each manifest load finds out whether this Python can
    verify that manifest's blocks.
    """
    if name == SHA256:
        return _sha256_hex
    if name != BLAKE3:
        raise UserError(f"{origin}: block_hash {name!r} is not one of {list(NAMES)}")
    try:
        from blake3 import blake3
    except ImportError:
        raise UserError(
            f"{origin}: the dataset's blocks are hashed with BLAKE3 and this Python "
            f"({sys.executable}) has no blake3 module: install it where the jobs run "
            f"(`{sys.executable} -m pip install blake3`, or in the container_image or env_tarball)"
        ) from None

    def blake3_hex(data: bytes | bytearray | memoryview) -> str:
        return blake3(data).hexdigest()

    return blake3_hex


_LOADED: dict[str, HexDigest] = {}


def matches(name: str, digest: str, data: bytes | bytearray | memoryview) -> bool:
    """True when data's `name` digest starts with `digest` (a manifest's prefix, or all of it)."""
    function = _LOADED.get(name)
    if function is None:
        function = _LOADED[name] = hex_digest_function(name, f"a block hashed with {name}")
    return function(data).startswith(digest)
