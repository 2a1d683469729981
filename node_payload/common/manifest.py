"""Dataset manifest: the single description of which fragment is which pixels in which shard bytes.

Format "dagtrain-dataset/2" stores pixels once. Each source image is reflection-padded by
`margin` pixels and cut into a grid of `block` x `block` blocks, each encoded on its own and
stored contiguously (row-major) in one shard. A fragment is (source, position, angle); it is never
stored: a node cuts the square *context* of side tile + 2 * margin (at least tile * sqrt(2), so a
rotation leaves no empty corner) from the few blocks under it, rotates it and crops the tile.

Fragments are an implicit index, never one row each: source s has nx * ny positions (stride
`stride`, x = 0, stride, ...) and every position has n_angles angles, so

    fragment id = (first_position[s] + py * nx + px) * n_angles + angle index.

Every block is verified by a prefix of its digest (`hashes`, HASH_HEX hex digits per block) under
the hash the manifest names (`block_hash`, see node_payload.common.block_hash). Format
"dagtrain-dataset/3" names it; "dagtrain-dataset/2", which has no `block_hash`, used sha256 and
still loads.

Every node, the planner and the aggregator read the same manifest, so it is validated strictly on
load: a bad manifest fails once, clearly, on the submit machine. Shard paths are confined to the
dataset root because they become FTP paths.
"""

import hashlib
import json
import math
import re
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from node_payload.common import block_hash
from node_payload.common.block_hash import HASH_HEX
from node_payload.common.errors import UserError
from node_payload.common.manifest_limits import MAX_BLOCK, MAX_MANIFEST_BYTES, size_problem

FORMAT = "dagtrain-dataset/3"
FORMAT_SHA256 = "dagtrain-dataset/2"  # before `block_hash`: every block hashed with sha256
MODES = ("L", "RGB")
CODECS = ("jpeg", "png")
_KEYS = {
    *("format", "tile", "overlap", "stride", "margin", "block", "angles", "codec"),
    *("holdout", "seed", "mode", "classes", "sources", "shards"),
}
_KEYS_BY_FORMAT = {FORMAT: _KEYS | {"block_hash"}, FORMAT_SHA256: _KEYS}
# Written by pipeline.dataset_prepare so that re-preparing the same data can be recognised.
_OPTIONAL_KEYS = {"prepared_from"}
_SOURCE_KEYS = {
    *("path", "label", "width", "height", "holdout"),
    *("shard", "offset", "lengths", "hashes"),
}
_SHARD_KEYS = {"path", "bytes", "sha256"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEXES = re.compile(r"[0-9a-f]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def stride_for(tile: int, overlap: float) -> int:
    return max(1, round(tile * (1 - overlap)))


def margin_for(tile: int) -> int:
    """Padding around a tile so that its context (tile + 2 margin) >= tile * sqrt(2) + 2: any
    rotation of the context covers the centred tile, with a pixel to spare for bilinear taps."""
    return math.ceil((tile * math.sqrt(2) + 2 - tile) / 2)


def positions(size: int, tile: int, stride: int) -> int:
    """Tile positions along one side: (size - tile) // stride + 1 (margins under a stride drop)."""
    return (size - tile) // stride + 1


@dataclass(frozen=True, slots=True)
class DataFile:
    """A file of the dataset besides the manifest: what an uploader copies and verifies."""

    path: str  # relative to the dataset root, POSIX separators
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Source:
    path: str
    label: int
    width: int
    height: int
    holdout: bool
    nx: int  # tile positions per row
    ny: int
    shard: str
    offset: int  # first byte of the source's first block
    lengths: tuple[int, ...]  # encoded size of every block, row-major
    hashes: str  # HASH_HEX hex digits per block


@dataclass(frozen=True, slots=True)
class Block:
    """Stored bytes: what fetching reads and verifies (`digest`: a prefix of the bytes' digest
    under the manifest's block hash, `hash_name`)."""

    id: int
    shard: str
    offset: int
    length: int
    digest: str
    hash_name: str

    def matches(self, data: bytes | bytearray | memoryview) -> bool:
        """True when data are this block's bytes."""
        return block_hash.matches(self.hash_name, self.digest, data)


@dataclass(frozen=True, slots=True)
class Fragment:
    id: int
    source: int
    label: int
    x: int  # tile origin in the source image
    y: int
    angle: int  # degrees, counter-clockwise


class Manifest:
    """A validated manifest; built only from bytes so that `digest` always identifies it."""

    def __init__(self, doc: dict[str, Any], raw: bytes, origin: str) -> None:
        self.origin = origin
        self.tile: int = doc["tile"]
        self.overlap: float = doc["overlap"]
        self.stride: int = doc["stride"]
        self.margin: int = doc["margin"]
        self.block: int = doc["block"]
        self.angle_range: tuple[int, int, int] = tuple(doc["angles"])
        self.angles: list[int] = list(range(*self.angle_range))
        self.codec: str = doc["codec"]
        self.holdout: float = doc["holdout"]
        self.seed: int = doc["seed"]
        self.mode: str = doc["mode"]
        self.classes: list[str] = list(doc["classes"])
        self._files = [DataFile(s["path"], s["bytes"], s["sha256"]) for s in doc["shards"]]
        self.shards: list[str] = [f.path for f in self._files]
        self.prepared_from: dict[str, Any] | None = doc.get("prepared_from")
        self.block_hash: str = doc.get("block_hash", block_hash.SHA256)
        block_hash.hex_digest_function(self.block_hash, origin)  # this Python can verify them
        self.sources = [
            Source(
                s["path"],
                s["label"],
                s["width"],
                s["height"],
                s["holdout"],
                positions(s["width"], self.tile, self.stride),
                positions(s["height"], self.tile, self.stride),
                self.shards[s["shard"]],
                s["offset"],
                tuple(s["lengths"]),
                s["hashes"],
            )
            for s in doc["sources"]
        ]
        self._first: list[int] = []  # first fragment id of each source, then the total
        self._first_block: list[int] = []
        fragments = blocks = 0
        for source in self.sources:
            self._first.append(fragments)
            self._first_block.append(blocks)
            fragments += source.nx * source.ny * len(self.angles)
            blocks += len(source.lengths)
        self._first.append(fragments)
        self._first_array = np.array(self._first, dtype=np.int64)
        self._nx = np.array([s.nx for s in self.sources], dtype=np.int64)
        self._nbx = np.array([self.block_grid(i)[0] for i in range(len(self.sources))], np.int64)
        self._first_block_array = np.array([*self._first_block, blocks], dtype=np.int64)
        self._starts: dict[int, list[int]] = {}  # source -> its blocks' offsets, when used
        self._raw = raw

    @classmethod
    def from_bytes(cls, data: bytes, origin: str) -> "Manifest":
        _check_length(len(data), origin)
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{origin}: not a valid JSON manifest ({exc})") from None
        _validate(doc, origin)
        return cls(doc, data, origin)

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        try:
            _check_length(Path(path).stat().st_size, str(path))
            data = Path(path).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read dataset manifest {path}: {exc.strerror}") from None
        return cls.from_bytes(data, str(path))

    def to_bytes(self) -> bytes:
        """The exact bytes the manifest was built from (what `digest` hashes)."""
        return self._raw

    def digest(self) -> str:
        return hashlib.sha256(self._raw).hexdigest()

    def files(self) -> list[DataFile]:
        """Every data file the manifest refers to, with the size and hash it must have."""
        return list(self._files)

    def __len__(self) -> int:
        """The number of fragments (positions x angles over all sources)."""
        return self._first[-1]

    @property
    def context(self) -> int:
        """Side of the square cut around a tile before rotation."""
        return self.tile + 2 * self.margin

    def by_source(self) -> dict[int, range]:
        """Source index -> its fragment ids (a contiguous range; never materialised)."""
        return {i: range(self._first[i], self._first[i + 1]) for i in range(len(self.sources))}

    def fragment(self, id_: int) -> Fragment:
        if not 0 <= id_ < len(self):
            raise IndexError(f"fragment {id_} is not in {self.origin}")
        s = bisect_right(self._first, id_) - 1
        source = self.sources[s]
        position, angle = divmod(id_ - self._first[s], len(self.angles))
        py, px = divmod(position, source.nx)
        return Fragment(
            id_, s, source.label, px * self.stride, py * self.stride, self.angles[angle]
        )

    def position_of(self, id_: int) -> int:
        """Global position index of a fragment: the same for all its angles."""
        return id_ // len(self.angles)

    def blocks(self, fragment: Fragment) -> tuple[list[Block], tuple[int, int]]:
        """The blocks under the fragment's context (row-major) and the context's origin inside
        the first one. Padded-image coordinates: tile (x, y) has context origin (x, y)."""
        source = self.sources[fragment.source]
        nbx = -(-(source.width + 2 * self.margin) // self.block)
        b = self.block
        x0, y0 = fragment.x, fragment.y
        x1, y1 = x0 + self.context - 1, y0 + self.context - 1
        out = []
        for by in range(y0 // b, y1 // b + 1):
            for bx in range(x0 // b, x1 // b + 1):
                out.append(self._block(fragment.source, by * nbx + bx))
        return out, (x0 % b, y0 % b)

    def blocks_under(self, ids: Sequence[int]) -> list[Block]:
        """The distinct blocks under the contexts of the given fragments, by block id.

        What `blocks` gives fragment by fragment, in one numpy pass over the implicit index: a
        node resolves thousands of fragments, and a Python call per fragment and per block took
        longer than downloading their bytes.
        """
        frags = np.asarray(ids, dtype=np.int64).reshape(-1)
        if frags.size and (frags.min() < 0 or frags.max() >= len(self)):
            bad = frags[(frags < 0) | (frags >= len(self))][0]
            raise IndexError(f"fragment {bad} is not in {self.origin}")
        source = np.searchsorted(self._first_array, frags, side="right") - 1
        position = (frags - self._first_array[source]) // len(self.angles)
        py, px = np.divmod(position, self._nx[source])
        b, reach = self.block, self.context - 1
        x0, y0 = px * self.stride // b, py * self.stride // b  # first block column and row
        x1, y1 = (px * self.stride + reach) // b, (py * self.stride + reach) // b
        step = np.arange(reach // b + 2)  # at most this many blocks per side of a context
        bx, by = x0[:, None] + step, y0[:, None] + step
        inside = (by <= y1[:, None])[:, :, None] & (bx <= x1[:, None])[:, None, :]
        k = by[:, :, None] * self._nbx[source][:, None, None] + bx[:, None, :]
        block_ids = np.unique((k + self._first_block_array[source][:, None, None])[inside])
        return self._blocks_by_id(block_ids)

    def _blocks_by_id(self, block_ids: np.ndarray) -> list[Block]:
        """Blocks from sorted global block ids, source by source."""
        out: list[Block] = []
        cuts = np.searchsorted(block_ids, self._first_block_array)
        for s in np.flatnonzero(cuts[1:] > cuts[:-1]).tolist():
            ks = (block_ids[cuts[s] : cuts[s + 1]] - self._first_block[s]).tolist()
            src, starts = self.sources[s], self._block_starts(s)
            first, h, name = self._first_block[s], HASH_HEX, self.block_hash
            out += [
                Block(
                    first + k,
                    src.shard,
                    starts[k],
                    src.lengths[k],
                    src.hashes[k * h : k * h + h],
                    name,
                )
                for k in ks
            ]
        return out

    def _block_starts(self, source: int) -> list[int]:
        """Offsets of the source's blocks in its shard (computed once: a node resolves thousands)."""
        starts = self._starts.get(source)
        if starts is None:
            src = self.sources[source]
            starts = self._starts[source] = np.cumsum((src.offset, *src.lengths)).tolist()
        return starts

    def block_grid(self, source: int) -> tuple[int, int]:
        src = self.sources[source]
        padded = (src.width + 2 * self.margin, src.height + 2 * self.margin)
        return -(-padded[0] // self.block), -(-padded[1] // self.block)

    def _block(self, source: int, k: int) -> Block:
        src = self.sources[source]
        return Block(
            self._first_block[source] + k,
            src.shard,
            self._block_starts(source)[k],
            src.lengths[k],
            src.hashes[k * HASH_HEX : (k + 1) * HASH_HEX],
            self.block_hash,
        )


def encode(doc: dict[str, Any]) -> bytes:
    """Canonical serialisation used by the dataset preparation (compact: manifests get large)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _fail(origin: str, message: str) -> UserError:
    return UserError(f"{origin}: {message}; re-run `dagtrain prepare` to rebuild the dataset")


def _check_length(n: int, origin: str) -> None:
    """Nodes never read a manifest longer than MAX_MANIFEST_BYTES: refuse to plan with one."""
    if n > MAX_MANIFEST_BYTES:
        raise _fail(
            origin, f"the manifest is {n} bytes, more than the {MAX_MANIFEST_BYTES} allowed"
        )


def _is_int(value: Any, minimum: int = 0) -> bool:
    return type(value) is int and value >= minimum


def _relative_path(value: Any) -> bool:
    """True for a non-empty, normalised POSIX path that stays inside the dataset root.

    Shard paths become FTP commands: a control character (CR LF) would end the command.
    """
    if not isinstance(value, str) or "\\" in value or _CONTROL.search(value):
        return False
    path = PurePosixPath(value)
    return (
        str(path) == value
        and path.parts != ()
        and not path.is_absolute()
        and ".." not in path.parts
        and not re.match(r"[A-Za-z]:", value)
    )


def _validate(doc: Any, origin: str) -> None:
    if not isinstance(doc, dict):
        raise _fail(origin, "the manifest must be a JSON object")
    keys = _KEYS_BY_FORMAT.get(doc.get("format"))
    if keys is None:
        raise _fail(
            origin,
            f"format is {doc.get('format')!r}, expected {FORMAT!r} (or the older {FORMAT_SHA256!r})",
        )
    missing = sorted(keys - doc.keys())
    unknown = sorted(doc.keys() - keys - _OPTIONAL_KEYS)
    if missing or unknown:
        raise _fail(origin, f"missing keys {missing}, unknown keys {unknown}")
    if "block_hash" in doc and doc["block_hash"] not in block_hash.NAMES:
        raise _fail(
            origin,
            f"block_hash must be one of {list(block_hash.NAMES)}, not {doc['block_hash']!r}",
        )
    _validate_parameters(doc, origin)
    _validate_shards(doc, origin)
    _validate_sources(doc, origin)
    problem = size_problem(doc)
    if problem:
        raise _fail(origin, problem)


def _validate_parameters(doc: dict[str, Any], origin: str) -> None:
    if not _is_int(doc["tile"], 1):
        raise _fail(origin, f"tile must be a positive integer, not {doc['tile']!r}")
    for key in ("overlap", "holdout"):
        value = doc[key]
        if type(value) not in (int, float) or not 0 <= value < 1:
            raise _fail(origin, f"{key} must be a number in [0, 1), not {value!r}")
    if doc["stride"] != stride_for(doc["tile"], doc["overlap"]):
        raise _fail(origin, f"stride {doc['stride']!r} does not match tile and overlap")
    if not _is_int(doc["margin"]) or doc["margin"] < margin_for(doc["tile"]):
        raise _fail(origin, f"margin {doc['margin']!r} is too small for tile {doc['tile']}")
    if not _is_int(doc["block"], 1):
        raise _fail(origin, f"block must be a positive integer, not {doc['block']!r}")
    if doc["block"] > MAX_BLOCK:
        raise _fail(
            origin, f"block is {doc['block']} px, more than the {MAX_BLOCK} px any dataset uses"
        )
    angles = doc["angles"]
    if not (
        isinstance(angles, list) and len(angles) == 3 and all(_is_int(a) for a in angles)
    ) or not (angles[2] >= 1 and angles[0] < angles[1] <= 360):
        raise _fail(origin, f"angles must be [start, stop, step] degrees, not {angles!r}")
    if doc["codec"] not in CODECS:
        raise _fail(origin, f"codec must be one of {list(CODECS)}, not {doc['codec']!r}")
    if not _is_int(doc["seed"]):
        raise _fail(origin, f"seed must be a non-negative integer, not {doc['seed']!r}")
    if doc["mode"] not in MODES:
        raise _fail(origin, f"mode must be one of {list(MODES)}, not {doc['mode']!r}")
    classes = doc["classes"]
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) and c for c in classes)
        or classes != sorted(set(classes))
    ):
        raise _fail(origin, "classes must be a non-empty sorted list of distinct names")


def _validate_shards(doc: dict[str, Any], origin: str) -> None:
    shards = doc["shards"]
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and s.keys() == _SHARD_KEYS for s in shards
    ):
        raise _fail(origin, f"shards must be a list of objects with keys {sorted(_SHARD_KEYS)}")
    paths = [shard["path"] for shard in shards]
    if len(set(map(str, paths))) != len(paths):
        raise _fail(origin, "shard paths must be distinct")
    for shard in shards:
        if not _relative_path(shard["path"]):
            raise _fail(
                origin, f"shard path {shard['path']!r} is not a relative path inside the dataset"
            )
        if not _is_int(shard["bytes"]):
            raise _fail(origin, f"shard {shard['path']!r}: bytes must be a non-negative integer")
        if not isinstance(shard["sha256"], str) or not _SHA256.fullmatch(shard["sha256"]):
            raise _fail(origin, f"shard {shard['path']!r}: sha256 must be 64 lowercase hex digits")


def _validate_sources(doc: dict[str, Any], origin: str) -> None:
    sources = doc["sources"]
    if not isinstance(sources, list) or not sources:
        raise _fail(origin, "sources must be a non-empty list")
    n_classes = len(doc["classes"])
    tile, margin, block, shards = doc["tile"], doc["margin"], doc["block"], doc["shards"]
    for i, source in enumerate(sources):
        if not isinstance(source, dict) or source.keys() != _SOURCE_KEYS:
            raise _fail(origin, f"source {i} must have exactly the keys {sorted(_SOURCE_KEYS)}")
        where = f"source {i} ({source['path']!r})"
        if not _relative_path(source["path"]):
            raise _fail(origin, f"{where}: path must be relative to the source directory")
        if not _is_int(source["label"]) or source["label"] >= n_classes:
            raise _fail(origin, f"{where}: label {source['label']!r} is not in [0, {n_classes})")
        if not (_is_int(source["width"], tile) and _is_int(source["height"], tile)):
            raise _fail(origin, f"{where}: width and height must be integers >= the tile")
        if type(source["holdout"]) is not bool:
            raise _fail(origin, f"{where}: holdout must be true or false")
        if not _is_int(source["shard"]) or source["shard"] >= len(shards):
            raise _fail(origin, f"{where}: shard {source['shard']!r} does not exist")
        lengths = source["lengths"]
        n_blocks = -(-(source["width"] + 2 * margin) // block) * -(
            -(source["height"] + 2 * margin) // block
        )
        if not (
            isinstance(lengths, list)
            and len(lengths) == n_blocks
            and all(_is_int(n, 1) for n in lengths)
        ):
            raise _fail(origin, f"{where}: lengths must list {n_blocks} positive block sizes")
        end = source["offset"] + sum(lengths) if _is_int(source["offset"]) else -1
        if not 0 <= end <= shards[source["shard"]]["bytes"]:
            raise _fail(origin, f"{where}: blocks lie outside {shards[source['shard']]['path']}")
        hashes = source["hashes"]
        if (
            not isinstance(hashes, str)
            or len(hashes) != HASH_HEX * n_blocks
            or not _HEXES.fullmatch(hashes)
        ):
            raise _fail(origin, f"{where}: hashes must be {HASH_HEX} hex digits per block")
