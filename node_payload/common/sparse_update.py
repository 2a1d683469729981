"""Sparse update files: the few values a compressed update sends, and their positions.

A sparse update is an update file (format dagtrain-update/1) whose metadata says
`compression = "dgc"`. Its model tensors are packed into one uint8 tensor, `::data`, a zlib
stream of, in this order:

1. the ascending flat positions of the sent values, as gaps coded as LEB128 varints (7 bits a
   byte, high bit set on every byte but a number's last). Positions run over the
   concatenation of the sparse tensors, in layout order;
2. the sent values, float16: first every value's high byte, then every low byte;
3. the float32 tensors sent dense (BatchNorm running statistics), concatenated in layout order
   and rounded to float16 (clamped to its range), high bytes then low bytes;
4. the int64 tensors sent dense (BatchNorm counters), concatenated, little-endian.

Metadata `layout` is base64 of zlib of the JSON object `{"sparse": [[name, shape], ...],
"f16": [...], "i64": [...], "sent": number of values, "idx": bytes of positions}`: every
packed tensor, so the file describes itself and a model mismatch is named by tensor. Tensors of
other dtypes (parameters that are not float32, say) are stored dense under their own names.

Why all this: each safetensors header entry costs about 70 bytes, and a small CNN's fixed costs
(a header entry per statistics tensor and counter, the statistics in float32: 3.8 KB) were larger
than its values at 99% sparsity. Why varint gaps, half precision and the high bytes grouped: a
kept value then costs about 3 bytes at 99% sparsity (int32 positions and float32 values: 8);
the high bytes (sign, exponent) of values of similar size repeat, which zlib finds. The node
keeps what half precision rounds off the sent values in its residual; the statistics lose it
(a relative 2^-11: see the README).

Names starting with "::" cannot collide with model tensor names (PyTorch names are dotted
attribute paths). The stream is inflated up to its declared size only; readers densify one
tensor at a time, so the aggregator's memory stays O(model); every position is checked (in
range, unique) and every value (finite) before any tensor is handed out.
"""

import base64
import binascii
import json
import math
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from node_payload.common import quantised_update, tensor_io

COMPRESSION = "dgc"
DATA = "::data"
MAX_HALF = 65504.0  # the largest finite float16: larger values are clamped, the rest stays behind
_MAX_VARINT_BYTES = 5  # 35 bits: more than any tensor's position needs
_GROUPS = ("sparse", "f16", "i64")
_MAX_DEFLATE_RATIO = 1032  # deflate inflates a byte to at most this many


class BadSparseUpdate(tensor_io.BadTensorFile):
    """A sparse update whose layout, positions or values cannot be trusted."""


@dataclass(frozen=True)
class SparseTensor:
    """One tensor's sent part: ascending flat positions (int64) and float16 values."""

    shape: tuple[int, ...]
    positions: torch.Tensor
    values: torch.Tensor


def encode_gaps(positions: np.ndarray) -> np.ndarray:
    """Ascending non-negative positions -> uint8 varints of their gaps (the first from 0)."""
    gaps = np.diff(positions.astype(np.int64), prepend=0)
    lengths = np.ones(len(gaps), dtype=np.int64)
    rest = gaps >> 7
    while rest.any():
        lengths += rest > 0
        rest >>= 7
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    for byte in range(int(lengths.max(initial=0))):
        has = lengths > byte
        chunk = (gaps[has] >> (7 * byte)) & 0x7F
        more = np.where(lengths[has] > byte + 1, 0x80, 0)
        out[starts[has] + byte] = chunk | more
    return out


def decode_gaps(data: np.ndarray) -> np.ndarray:
    """uint8 varints -> ascending positions (int64); raises BadSparseUpdate if malformed."""
    if len(data) == 0:
        return np.zeros(0, dtype=np.int64)
    last = (data & 0x80) == 0
    if not last[-1]:
        raise BadSparseUpdate("the index stream ends in the middle of a number")
    number = np.concatenate(([0], np.cumsum(last)[:-1]))
    first = np.flatnonzero(np.concatenate(([True], last[:-1])))
    place = np.arange(len(data)) - first[number]
    if place.max() >= _MAX_VARINT_BYTES:
        raise BadSparseUpdate(f"an index gap is longer than {_MAX_VARINT_BYTES} bytes")
    parts = (data & 0x7F).astype(np.int64) << (7 * place)
    gaps = np.zeros(len(first), dtype=np.int64)
    np.add.at(gaps, number, parts)
    if int(gaps.max()) * len(gaps) >= 2**62:  # no int64 overflow in the sum below
        raise BadSparseUpdate("the index gaps add up beyond any tensor size")
    return np.cumsum(gaps)


def _high_then_low(half: np.ndarray) -> bytes:
    pairs = half.astype("<f2").view(np.uint8).reshape(-1, 2)
    return pairs[:, 1].tobytes() + pairs[:, 0].tobytes()


def _from_high_then_low(data: bytes) -> np.ndarray:
    count = len(data) // 2
    pairs = np.empty((count, 2), dtype=np.uint8)
    pairs[:, 1] = np.frombuffer(data[:count], dtype=np.uint8)
    pairs[:, 0] = np.frombuffer(data[count:], dtype=np.uint8)
    return pairs.reshape(-1).view("<f2").astype(np.float16)


def pack(
    index: np.ndarray, values: np.ndarray, stats: np.ndarray, counters: np.ndarray
) -> torch.Tensor:
    """The `::data` tensor: uint8 varints, float16 values and statistics, int64 counters."""
    raw = (
        np.asarray(index, dtype=np.uint8).tobytes()
        + _high_then_low(np.asarray(values, dtype=np.float16))
        + _high_then_low(np.asarray(stats, dtype=np.float16))
        + np.asarray(counters, dtype="<i8").tobytes()
    )
    return torch.frombuffer(bytearray(zlib.compress(raw, 9)), dtype=torch.uint8)


def encode_layout(layout: Mapping[str, object]) -> str:
    text = json.dumps(layout, separators=(",", ":")).encode()
    return base64.b64encode(zlib.compress(text, 9)).decode("ascii")


def decode_layout(text: str) -> dict[str, object]:
    """The JSON object of metadata layout (no checks beyond its being JSON)."""
    inflate = zlib.decompressobj()
    raw = inflate.decompress(base64.b64decode(text, validate=True), 1 << 20)
    return json.loads(raw)


def encode(
    dense: Mapping[str, torch.Tensor], sparse: Mapping[str, SparseTensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the extra metadata of a sparse update file."""
    offset, positions, values = 0, [], []
    layout: dict[str, object] = {group: [] for group in _GROUPS}
    for name, part in sparse.items():
        positions.append(part.positions.to(torch.int64) + offset)
        values.append(part.values.to(torch.float16))
        layout["sparse"].append([name, list(part.shape)])
        offset += math.prod(part.shape)
    flat = torch.cat(positions).numpy() if positions else np.zeros(0, dtype=np.int64)
    index = encode_gaps(flat)
    tensors, stats, counters = {}, [np.zeros(0, dtype=np.float16)], [np.zeros(0, dtype=np.int64)]
    for name, tensor in dense.items():
        if tensor.dtype == torch.float32:
            layout["f16"].append([name, list(tensor.shape)])
            stats.append(tensor.flatten().clamp(-MAX_HALF, MAX_HALF).half().numpy())
        elif tensor.dtype == torch.int64:
            layout["i64"].append([name, list(tensor.shape)])
            counters.append(tensor.flatten().numpy())
        else:
            tensors[name] = tensor
    sent = torch.cat(values).numpy() if values else np.zeros(0, dtype=np.float16)
    layout["sent"], layout["idx"] = len(sent), len(index)
    tensors[DATA] = pack(index, sent, np.concatenate(stats), np.concatenate(counters))
    metadata = {"compression": COMPRESSION, "layout": encode_layout(layout)}
    return tensors, metadata


def save_sparse_update(
    path: Path,
    dense: Mapping[str, torch.Tensor],
    sparse: Mapping[str, SparseTensor],
    metadata: Mapping[str, str],
) -> None:
    """Write atomically, like every tensor file (see tensor_io.save_tensors)."""
    tensors, extra = encode(dense, sparse)
    tensor_io.save_tensors(path, tensors, {**metadata, **extra})


class UpdateReader:
    """A dense or sparse update seen as dense tensors, handed out one at a time.

    names are the model tensor names the file covers. For a sparse tensor, shape() and values()
    describe the sent part without densifying it (validation computes norms from the values).
    Packed dense tensors come back as float32 (statistics) or int64 (counters).
    """

    def __init__(self, lazy: tensor_io.LazyTensors, max_bytes: int | None = None) -> None:
        self._lazy = lazy
        self.metadata = lazy.metadata
        self._layout: dict[str, tuple[tuple[int, ...], int, int, int]] = {}
        self._packed: dict[str, tuple[np.ndarray, tuple[int, ...], int]] = {}
        compression = self.metadata.get("compression")
        if compression is None:
            self.names: list[str] = list(lazy.names)
            return
        if compression != COMPRESSION:
            known = ", ".join(map(repr, (COMPRESSION, *quantised_update.METHODS)))
            raise BadSparseUpdate(
                f"metadata compression is {compression!r}, expected one of {known} or none"
            )
        layout, sent, index_bytes = _parse_layout(self.metadata.get("layout"))
        own = [name for name in lazy.names if name != DATA]
        packed = [name for group in _GROUPS for name, _ in layout[group]]
        both = sorted(set(own) & set(packed))
        if both:
            raise BadSparseUpdate(f"tensor {both[0]!r} is in the file both packed and by name")
        sizes = {group: sum(math.prod(shape) for _, shape in layout[group]) for group in _GROUPS}
        raw = self._inflate(index_bytes + 2 * sent + 2 * sizes["f16"] + 8 * sizes["i64"], max_bytes)
        self._positions = decode_gaps(np.frombuffer(raw[:index_bytes], dtype=np.uint8))
        cut = index_bytes + 2 * sent
        self._values = torch.from_numpy(_from_high_then_low(raw[index_bytes:cut]))
        self._check_parts(sent, sizes["sparse"])
        stats = _from_high_then_low(raw[cut : cut + 2 * sizes["f16"]])
        if not np.isfinite(stats).all():
            raise BadSparseUpdate("the statistics sent dense contain NaN or Inf")
        counters = np.frombuffer(raw[cut + 2 * sizes["f16"] :], dtype="<i8").astype(np.int64)
        offset = 0
        for name, shape in layout["sparse"]:
            size = math.prod(shape)
            lo, hi = np.searchsorted(self._positions, [offset, offset + size])
            self._layout[name] = (shape, offset, int(lo), int(hi))
            offset += size
        for group, array in (("f16", stats), ("i64", counters)):
            offset = 0
            for name, shape in layout[group]:
                self._packed[name] = (array, shape, offset)
                offset += math.prod(shape)
        self.names = own + packed

    def _inflate(self, size: int, max_bytes: int | None) -> bytes:
        """The stream, inflated to exactly its declared size, which must fit max_bytes."""
        if max_bytes is not None and size > max_bytes:
            raise BadSparseUpdate(
                f"the layout says {size} bytes, more than the {max_bytes} the model can need"
            )
        if DATA not in self._lazy.names:
            raise BadSparseUpdate(f"the sparse update has no {DATA!r} tensor")
        data = self._lazy.get(DATA)
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise BadSparseUpdate(
                f"{DATA!r} is {data.dtype} of shape {tuple(data.shape)}, expected a 1-D uint8"
            )
        most = _MAX_DEFLATE_RATIO * len(data) + 64
        if size > most:
            raise BadSparseUpdate(
                f"the layout says {size} bytes, more than {len(data)} zlib bytes can hold"
            )
        inflate = zlib.decompressobj()
        try:
            raw = inflate.decompress(data.numpy().tobytes(), size + 1)
        except zlib.error as err:
            raise BadSparseUpdate(f"{DATA!r} is not a zlib stream ({err})") from None
        if len(raw) != size or not inflate.eof:
            what = f"{len(raw)} bytes" if len(raw) <= size else "more bytes"
            raise BadSparseUpdate(f"{DATA!r} holds {what}, the layout says {size}")
        return raw

    def _check_parts(self, sent: int, total: int) -> None:
        positions, values = self._positions, self._values
        if len(positions) != sent:
            raise BadSparseUpdate(f"{len(positions)} indices but {sent} values")
        if len(positions) and positions[-1] >= total:
            raise BadSparseUpdate(
                f"index {positions[-1]} is out of range: the sparse tensors hold {total} values"
            )
        repeated = np.flatnonzero(np.diff(positions) == 0)
        if len(repeated):
            where = int(positions[repeated[0]])
            raise BadSparseUpdate(f"index {where} appears more than once")
        if not torch.isfinite(values).all():
            raise BadSparseUpdate("the sent values contain NaN or Inf")

    def is_sparse(self, name: str) -> bool:
        return name in self._layout

    def shape(self, name: str) -> tuple[int, ...]:
        return self._layout[name][0]

    def values(self, name: str) -> torch.Tensor:
        _, _, lo, hi = self._layout[name]
        return self._values[lo:hi]

    def get(self, name: str) -> torch.Tensor:
        """The dense tensor: sparse ones are float32 with zeros where nothing was sent."""
        if name in self._packed:
            array, shape, offset = self._packed[name]
            part = torch.from_numpy(array[offset : offset + math.prod(shape)].copy())
            return (part.float() if part.dtype == torch.float16 else part).reshape(shape)
        if name not in self._layout:
            return self._lazy.get(name)
        shape, offset, lo, hi = self._layout[name]
        dense = torch.zeros(math.prod(shape), dtype=torch.float32)
        dense[torch.from_numpy(self._positions[lo:hi] - offset)] = self._values[lo:hi].float()
        return dense.reshape(shape)


def _parse_layout(
    text: str | None,
) -> tuple[dict[str, list[tuple[str, tuple[int, ...]]]], int, int]:
    """metadata layout -> the tensors of each group, the number of values, the index bytes."""
    expected = 'base64 of zlib of {"sparse", "f16", "i64": [[name, shape], ...], "sent", "idx"}'
    problem = BadSparseUpdate(f"metadata layout is not {expected}")
    try:
        raw = decode_layout(text or "")
    except (binascii.Error, zlib.error, ValueError):
        raise problem from None
    if not isinstance(raw, dict) or set(raw) != {*_GROUPS, "sent", "idx"}:
        raise problem
    if not all(type(raw[key]) is int and raw[key] >= 0 for key in ("sent", "idx")):
        raise problem
    layout = {}
    for group in _GROUPS:
        if not isinstance(raw[group], list):
            raise problem
        layout[group] = []
        for entry in raw[group]:
            if not (
                isinstance(entry, list)
                and len(entry) == 2
                and isinstance(entry[0], str)
                and isinstance(entry[1], list)
                and all(type(n) is int and n >= 0 for n in entry[1])
            ):
                raise problem
            layout[group].append((entry[0], tuple(entry[1])))
    names = [name for group in _GROUPS for name, _ in layout[group]]
    if len(set(names)) != len(names):
        raise BadSparseUpdate("metadata layout names a tensor twice")
    return layout, raw["sent"], raw["idx"]


@contextmanager
def open_update(
    path: Path, max_bytes: int | None = None
) -> Iterator[UpdateReader | quantised_update.QuantisedReader]:
    """Open a dense, sparse or quantised update for streaming; raises BadTensorFile.

    max_bytes bounds the packed stream before it is inflated (the validator gives what the
    global model's tensors can need), so a small file cannot claim gigabytes."""
    with tensor_io.open_lazy(path) as lazy:
        method = lazy.metadata.get("compression")
        if method in quantised_update.METHODS:
            yield quantised_update.QuantisedReader(lazy, method)
        else:
            yield UpdateReader(lazy, max_bytes)


def load_update(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor densified, and the metadata."""
    with open_update(path) as update:
        return {name: update.get(name) for name in update.names}, update.metadata
