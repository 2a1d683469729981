"""A global model as a delta to the version before it: what a node holding v-1 fetches instead.

A model file is safetensors: 8 bytes of header length, the JSON header (each tensor's dtype,
shape and byte range; the metadata, whose `version` changes every version) and the tensors'
bytes. A delta from v-1 to v is a safetensors file (format dagtrain-model-delta/1) holding v's
header bytes as they are (`::header`, uint8) and, per tensor whose bytes changed, the flat
positions of the changed elements (`NAME::idx`, int32, ascending) and their new values
(`NAME::val`, the tensor's own dtype). Elements are compared and replaced as bytes, so the node
rebuilds v's file byte for byte whatever safetensors or torch version it has, and checks it
against the pointer's sha256 before anything trains on it. Its metadata names the run, both
versions and both files' sha256, which must be the pointer's.

A delta is only as small as few elements change: the default server step (`sgd`, momentum 0)
moves only the parameters some update sent, but BatchNorm statistics change every round, and
server momentum or Adam move every element an update ever touched. The aggregation publishes a
delta only when it is smaller than the model (docs/benchmarks.md measures how small).
"""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from node_payload.common import tensor_io

FORMAT = "dagtrain-model-delta/1"
HEADER = "::header"
_IDX, _VAL = "::idx", "::val"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header
# safetensors dtype names of the tensors a model may hold, as torch dtypes
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class BadDelta(ValueError):
    """A delta that must not be applied: why, in words."""


@dataclass(frozen=True)
class DeltaIdentity:
    """What a delta must say of itself: its run, the versions it goes between, and the sha256 of
    the file it applies to and of the file it makes."""

    run_id: str
    base_version: int
    version: int
    base_sha256: str
    sha256: str

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "run_id": self.run_id,
            "base_version": str(self.base_version),
            "version": str(self.version),
            "base_sha256": self.base_sha256,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def items(self) -> int:
        return (self.end - self.start) // _DTYPES[self.dtype].itemsize


def _layout(data: bytes | bytearray) -> tuple[int, dict[str, _Entry]]:
    """Where the tensor bytes start, and each tensor's entry; BadDelta for what is no model."""
    if len(data) < 8:
        raise BadDelta("shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if not 2 <= size <= min(MAX_HEADER_BYTES, len(data) - 8):
        raise BadDelta(f"header length {size} does not fit the file")
    return 8 + size, _entries(bytes(data[8 : 8 + size]))


def _entries(header: bytes) -> dict[str, _Entry]:
    try:
        raw = json.loads(header)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadDelta(f"header is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise BadDelta("header is not a JSON object")
    entries = {}
    for name, entry in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = (
                entry["dtype"],
                tuple(entry["shape"]),
                entry["data_offsets"],
            )
        except (TypeError, KeyError, ValueError):
            raise BadDelta(f"header entry {name!r} is not a tensor's") from None
        if not isinstance(dtype, str) or dtype not in _DTYPES or not _offsets(start, end):
            raise BadDelta(f"header entry {name!r}: dtype {dtype!r} or offsets not a model's")
        size = _DTYPES[dtype].itemsize * _count(shape)
        if end - start != size:
            raise BadDelta(f"header entry {name!r}: {end - start} bytes for {size}")
        entries[name] = _Entry(dtype, shape, start, end)
    return entries


def _offsets(start: object, end: object) -> bool:
    return type(start) is int and type(end) is int and 0 <= start <= end


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise BadDelta(f"shape {shape} is not a shape")
        n *= dim
    return n


def _rows(data: bytearray, offset: int, entry: _Entry) -> torch.Tensor:
    """A tensor's bytes in `data` (from `offset`), one row per element, shared with `data`."""
    if entry.end == entry.start:
        return torch.empty((0, _DTYPES[entry.dtype].itemsize), dtype=torch.uint8)
    raw = torch.frombuffer(
        data, dtype=torch.uint8, count=entry.end - entry.start, offset=offset + entry.start
    )
    return raw.view(entry.items, _DTYPES[entry.dtype].itemsize)


def make_delta(base: bytes, model: bytes, identity: DeltaIdentity) -> dict[str, torch.Tensor]:
    """The delta's tensors from `base`'s file bytes to `model`'s (save them with
    identity.metadata()); BadDelta when the two files do not hold the same tensors."""
    base_start, base_entries = _layout(base)
    start, entries = _layout(model)
    if entries != base_entries:
        raise BadDelta("the two versions do not hold the same tensors")
    old, new = bytearray(base), bytearray(model)
    tensors = {HEADER: torch.frombuffer(bytearray(model[8:start]), dtype=torch.uint8)}
    for name, entry in entries.items():
        before, after = _rows(old, base_start, entry), _rows(new, start, entry)
        changed = (before != after).any(dim=1).nonzero().flatten()
        if len(changed):
            if entry.items >= 2**31:
                raise BadDelta(f"tensor {name!r} has too many elements for int32 positions")
            values = after[changed].contiguous().view(_DTYPES[entry.dtype]).flatten()
            tensors[name + _IDX] = changed.to(torch.int32)
            tensors[name + _VAL] = values
    return tensors


def write_delta(base: Path, model: Path, target: Path, identity: DeltaIdentity) -> int:
    """Write the delta from `base` to `model` into `target`; its size in bytes."""
    tensors = make_delta(base.read_bytes(), model.read_bytes(), identity)
    tensor_io.save_tensors(target, tensors, identity.metadata())
    return target.stat().st_size


def apply_delta(base: bytes, delta: Path, identity: DeltaIdentity) -> bytes:
    """The model file `delta` makes of `base`, exactly the one `identity.sha256` names;
    BadDelta when the delta is not the one the pointer names, does not fit the base, or makes
    other bytes."""
    try:
        tensors, meta = tensor_io.load_tensors(delta)
    except (tensor_io.BadTensorFile, OSError) as exc:
        raise BadDelta(f"unreadable ({exc})") from None
    if meta != identity.metadata():
        wrong = sorted(
            k for k in {*meta, *identity.metadata()} if meta.get(k) != identity.metadata().get(k)
        )
        raise BadDelta(f"it is not the delta the pointer names (metadata {', '.join(wrong)})")
    if hashlib.sha256(base).hexdigest() != identity.base_sha256:
        raise BadDelta("the cached base is not the version the delta applies to")
    header = tensors.pop(HEADER, None)
    if header is None or header.dtype != torch.uint8 or header.dim() != 1:
        raise BadDelta(f"no uint8 {HEADER} tensor")
    header_bytes = bytes(header.tolist())
    base_start, entries = _layout(base)
    if _entries(header_bytes) != entries:
        raise BadDelta("its header's tensors are not the base's")
    data = bytearray(base[base_start:])
    for name, (idx, val) in _changes(tensors, entries).items():
        entry = entries[name]
        rows = _rows(data, 0, entry)
        rows[idx.long()] = val.contiguous().view(torch.uint8).view(len(idx), -1)
    made = len(header_bytes).to_bytes(8, "little") + header_bytes + bytes(data)
    digest = hashlib.sha256(made).hexdigest()
    if digest != identity.sha256:
        raise BadDelta(f"the model it makes has sha256 {digest[:12]}..., not the pointer's")
    return made


def _changes(
    tensors: Mapping[str, torch.Tensor], entries: Mapping[str, _Entry]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each changed tensor's positions and values, all checked before any is applied."""
    names = {key.rsplit("::", 1)[0] for key in tensors}
    if {k for n in names for k in (n + _IDX, n + _VAL)} != tensors.keys():
        raise BadDelta("its tensors are not positions and values in pairs")
    changes = {}
    for name in sorted(names):
        if name not in entries:
            raise BadDelta(f"tensor {name!r} is not in the model")
        entry, idx, val = entries[name], tensors[name + _IDX], tensors[name + _VAL]
        dtype = _DTYPES[entry.dtype]
        if idx.dtype != torch.int32 or idx.dim() != 1:
            raise BadDelta(f"{name}{_IDX} is {idx.dtype} {tuple(idx.shape)}, not 1-D int32")
        if val.dtype != dtype or tuple(val.shape) != tuple(idx.shape):
            raise BadDelta(
                f"{name}{_VAL} is {val.dtype} {tuple(val.shape)}, not {dtype} ({len(idx)},)"
            )
        if len(idx) and (idx[0] < 0 or idx[-1] >= entry.items or (idx.diff() <= 0).any()):
            raise BadDelta(
                f"{name}{_IDX}: positions not ascending within the tensor's {entry.items}"
            )
        changes[name] = (idx, val)
    return changes
