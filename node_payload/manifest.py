"""Dataset manifest: the single source of truth about which fragment lives in which shard bytes.

Every node, the planner and the aggregator read the same manifest, so it is validated strictly on
load: a bad manifest must fail once, clearly, on the submit machine rather than as obscure errors
on execute nodes. Shard paths are confined to the dataset root because they become FTP paths.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from node_payload.errors import UserError

FORMAT = "dagtrain-dataset/1"
COLUMNS = ["source", "x", "y", "shard", "offset", "length", "sha256"]
MODES = ("L", "RGB")
_KEYS = {
    *("format", "tile", "overlap", "holdout", "seed", "mode"),
    *("classes", "sources", "shards", "fragments"),
}
# Written by pipeline.dataset_prepare so that re-preparing the same data can be recognised.
_OPTIONAL_KEYS = {"prepared_from"}
_SOURCE_KEYS = {"path", "label", "width", "height", "holdout"}
_SHARD_KEYS = {"path", "bytes", "sha256"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Source:
    path: str
    label: int
    width: int
    height: int
    holdout: bool


@dataclass(frozen=True, slots=True)
class DataFile:
    """A file of the dataset besides the manifest: what an uploader copies and verifies."""

    path: str  # relative to the dataset root, POSIX separators
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Fragment:
    id: int
    source: int
    label: int
    x: int
    y: int
    shard: str
    offset: int
    length: int
    sha256: str


class Manifest:
    """A validated manifest; built only from bytes so that `digest` always identifies it."""

    def __init__(self, doc: dict[str, Any], raw: bytes, origin: str) -> None:
        self.origin = origin
        self.tile: int = doc["tile"]
        self.overlap: float = doc["overlap"]
        self.holdout: float = doc["holdout"]
        self.seed: int = doc["seed"]
        self.mode: str = doc["mode"]
        self.classes: list[str] = list(doc["classes"])
        self._files = [DataFile(s["path"], s["bytes"], s["sha256"]) for s in doc["shards"]]
        self.shards: list[str] = [f.path for f in self._files]
        self.prepared_from: dict[str, Any] | None = doc.get("prepared_from")
        self.sources = [Source(**s) for s in doc["sources"]]
        labels = [s.label for s in self.sources]
        shards = self.shards
        self.fragments = [
            Fragment(i, r[0], labels[r[0]], r[1], r[2], shards[r[3]], r[4], r[5], r[6])
            for i, r in enumerate(doc["fragments"]["rows"])
        ]
        self._raw = raw

    @classmethod
    def from_bytes(cls, data: bytes, origin: str) -> "Manifest":
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{origin}: not a valid JSON manifest ({exc})") from None
        _validate(doc, origin)
        return cls(doc, data, origin)

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        try:
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

    def by_source(self) -> dict[int, list[int]]:
        """Source index -> fragment ids; every source has at least one fragment."""
        groups: dict[int, list[int]] = {i: [] for i in range(len(self.sources))}
        for fragment in self.fragments:
            groups[fragment.source].append(fragment.id)
        return groups


def encode(doc: dict[str, Any]) -> bytes:
    """Canonical serialisation used by the dataset preparation (compact: manifests get large)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _fail(origin: str, message: str) -> UserError:
    return UserError(f"{origin}: {message}; re-run `dagtrain prepare` to rebuild the dataset")


def _is_int(value: Any, minimum: int = 0) -> bool:
    return type(value) is int and value >= minimum


def _relative_path(value: Any) -> bool:
    """True for a non-empty POSIX path that stays inside the dataset root."""
    if not isinstance(value, str) or not value or "\\" in value or "\0" in value:
        return False
    path = PurePosixPath(value)
    return not path.is_absolute() and ".." not in path.parts and not re.match(r"[A-Za-z]:", value)


def _validate(doc: Any, origin: str) -> None:
    if not isinstance(doc, dict):
        raise _fail(origin, "the manifest must be a JSON object")
    if doc.get("format") != FORMAT:
        raise _fail(origin, f"format is {doc.get('format')!r}, expected {FORMAT!r}")
    missing = sorted(_KEYS - doc.keys())
    unknown = sorted(doc.keys() - _KEYS - _OPTIONAL_KEYS)
    if missing or unknown:
        raise _fail(origin, f"missing keys {missing}, unknown keys {unknown}")
    _validate_parameters(doc, origin)
    _validate_sources(doc, origin)
    _validate_fragments(doc, origin)


def _validate_parameters(doc: dict[str, Any], origin: str) -> None:
    if not _is_int(doc["tile"], 1):
        raise _fail(origin, f"tile must be a positive integer, not {doc['tile']!r}")
    for key in ("overlap", "holdout"):
        value = doc[key]
        if type(value) not in (int, float) or not 0 <= value < 1:
            raise _fail(origin, f"{key} must be a number in [0, 1), not {value!r}")
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
    for i, source in enumerate(sources):
        if not isinstance(source, dict) or source.keys() != _SOURCE_KEYS:
            raise _fail(origin, f"source {i} must have exactly the keys {sorted(_SOURCE_KEYS)}")
        where = f"source {i} ({source['path']!r})"
        if not _relative_path(source["path"]):
            raise _fail(origin, f"{where}: path must be relative to the source directory")
        if not _is_int(source["label"]) or source["label"] >= n_classes:
            raise _fail(origin, f"{where}: label {source['label']!r} is not in [0, {n_classes})")
        if not (_is_int(source["width"], 1) and _is_int(source["height"], 1)):
            raise _fail(origin, f"{where}: width and height must be positive integers")
        if type(source["holdout"]) is not bool:
            raise _fail(origin, f"{where}: holdout must be true or false")


def _validate_fragments(doc: dict[str, Any], origin: str) -> None:
    table = doc["fragments"]
    if not isinstance(table, dict) or table.keys() != {"columns", "rows"}:
        raise _fail(origin, "fragments must be an object with 'columns' and 'rows'")
    if table["columns"] != COLUMNS:
        raise _fail(origin, f"fragment columns are {table['columns']!r}, expected {COLUMNS}")
    rows = table["rows"]
    if not isinstance(rows, list):
        raise _fail(origin, "fragment rows must be a list")
    tile, sources, n_shards = doc["tile"], doc["sources"], len(doc["shards"])
    covered = [False] * len(sources)
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(COLUMNS):
            raise _fail(origin, f"fragment {i} must be a list of {len(COLUMNS)} values")
        source, x, y, shard, offset, length, sha256 = row
        if not _is_int(source) or source >= len(sources):
            raise _fail(origin, f"fragment {i}: source {source!r} does not exist")
        src = sources[source]
        if not (
            _is_int(x) and _is_int(y) and x + tile <= src["width"] and y + tile <= src["height"]
        ):
            raise _fail(origin, f"fragment {i}: tile at ({x!r}, {y!r}) is outside {src['path']}")
        if not _is_int(shard) or shard >= n_shards:
            raise _fail(origin, f"fragment {i}: shard {shard!r} does not exist")
        if not (_is_int(offset) and _is_int(length, 1)):
            raise _fail(origin, f"fragment {i}: offset/length {offset!r}/{length!r} invalid")
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise _fail(origin, f"fragment {i}: sha256 must be 64 lowercase hex digits")
        covered[source] = True
    if not all(covered):
        empty = sources[covered.index(False)]["path"]
        raise _fail(origin, f"source {empty!r} has no fragments")
