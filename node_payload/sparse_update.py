"""Sparse update files: the few values a compressed update sends, and their positions.

A sparse update is an update file (format dagtrain-update/1) whose metadata says
`compression = "dgc"`. It holds:

- the tensors sent dense (BatchNorm statistics, integer counters) under their own names;
- `::idx`, uint8: the ascending flat positions of the sent values, as gaps coded as LEB128
  varints (7 bits a byte, high bit set on every byte but a number's last). Positions run over
  the concatenation of the sparse tensors, in the order of metadata `sparse`;
- `::val`, float16: the sent values, in the same order;
- metadata `sparse`: JSON `[[name, shape], ...]`, the float32 tensors sent sparse.

Why one packed index and value tensor rather than a pair per tensor: each safetensors header
entry costs about 70 bytes, so a pair per tensor of a small CNN (28 entries) would be 2 KB, as
much as the values at 99.9% sparsity. Why varint gaps and half precision: a kept value then
costs about 3.3 bytes at 99% sparsity and 4 at 99.9% (int32 positions and float32 values: 8),
which the 100x target needs; the node keeps what half precision rounds off in its residual.

Names starting with "::" cannot collide with model tensor names (PyTorch names are dotted
attribute paths). Readers densify one tensor at a time, so the aggregator's memory stays
O(model); every position is checked (in range, unique) before any tensor is handed out.
"""

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from node_payload import tensor_io

COMPRESSION = "dgc"
INDEX = "::idx"
VALUES = "::val"
MAX_HALF = 65504.0  # the largest finite float16: larger values are clamped, the rest stays behind
_MAX_VARINT_BYTES = 5  # 35 bits: more than any tensor's position needs


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


def encode(
    dense: Mapping[str, torch.Tensor], sparse: Mapping[str, SparseTensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the extra metadata of a sparse update file."""
    offset, positions, values, layout = 0, [], [], []
    for name, part in sparse.items():
        positions.append(part.positions.to(torch.int64) + offset)
        values.append(part.values.to(torch.float16))
        layout.append([name, list(part.shape)])
        offset += math.prod(part.shape)
    flat = torch.cat(positions).numpy() if positions else np.zeros(0, dtype=np.int64)
    tensors = dict(dense)
    tensors[INDEX] = torch.from_numpy(encode_gaps(flat))
    tensors[VALUES] = torch.cat(values) if values else torch.zeros(0, dtype=torch.float16)
    metadata = {"compression": COMPRESSION, "sparse": json.dumps(layout, separators=(",", ":"))}
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
    """

    def __init__(self, lazy: tensor_io.LazyTensors) -> None:
        self._lazy = lazy
        self.metadata = lazy.metadata
        self._layout: dict[str, tuple[tuple[int, ...], int, int, int]] = {}
        compression = self.metadata.get("compression")
        if compression is None:
            self.names: list[str] = list(lazy.names)
            return
        if compression != COMPRESSION:
            raise BadSparseUpdate(
                f"metadata compression is {compression!r}, expected {COMPRESSION!r} or none"
            )
        layout = _parse_layout(self.metadata.get("sparse"))
        dense = [name for name in lazy.names if name not in (INDEX, VALUES)]
        both = sorted(set(dense) & {name for name, _ in layout})
        if both:
            raise BadSparseUpdate(f"tensor {both[0]!r} is in the file both dense and sparse")
        self._positions, self._values = self._read_parts(layout)
        offset = 0
        for name, shape in layout:
            size = math.prod(shape)
            lo, hi = np.searchsorted(self._positions, [offset, offset + size])
            self._layout[name] = (shape, offset, int(lo), int(hi))
            offset += size
        self.names = dense + [name for name, _ in layout]

    def _read_parts(
        self, layout: list[tuple[str, tuple[int, ...]]]
    ) -> tuple[np.ndarray, torch.Tensor]:
        parts = {}
        for name, dtype in ((INDEX, torch.uint8), (VALUES, torch.float16)):
            if name not in self._lazy.names:
                raise BadSparseUpdate(f"the sparse update has no {name!r} tensor")
            parts[name] = self._lazy.get(name)
            if parts[name].dtype != dtype or parts[name].dim() != 1:
                raise BadSparseUpdate(
                    f"{name!r} is {parts[name].dtype} of shape {tuple(parts[name].shape)}, "
                    f"expected a 1-D {dtype}"
                )
        positions = decode_gaps(parts[INDEX].numpy())
        values = parts[VALUES]
        if len(positions) != len(values):
            raise BadSparseUpdate(f"{len(positions)} indices but {len(values)} values")
        total = sum(math.prod(shape) for _, shape in layout)
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
        return positions, values

    def is_sparse(self, name: str) -> bool:
        return name in self._layout

    def shape(self, name: str) -> tuple[int, ...]:
        return self._layout[name][0]

    def values(self, name: str) -> torch.Tensor:
        _, _, lo, hi = self._layout[name]
        return self._values[lo:hi]

    def get(self, name: str) -> torch.Tensor:
        """The dense tensor: sparse ones are float32 with zeros where nothing was sent."""
        if name not in self._layout:
            return self._lazy.get(name)
        shape, offset, lo, hi = self._layout[name]
        dense = torch.zeros(math.prod(shape), dtype=torch.float32)
        dense[torch.from_numpy(self._positions[lo:hi] - offset)] = self._values[lo:hi].float()
        return dense.reshape(shape)


def _parse_layout(text: str | None) -> list[tuple[str, tuple[int, ...]]]:
    problem = BadSparseUpdate(f"metadata sparse is {text!r}, expected JSON [[name, shape], ...]")
    try:
        raw = json.loads(text or "")
    except json.JSONDecodeError:
        raise problem from None
    if not isinstance(raw, list):
        raise problem
    layout = []
    for entry in raw:
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], list)
            and all(type(n) is int and n >= 0 for n in entry[1])
        ):
            raise problem
        layout.append((entry[0], tuple(entry[1])))
    if len({name for name, _ in layout}) != len(layout):
        raise BadSparseUpdate("metadata sparse names a tensor twice")
    return layout


@contextmanager
def open_update(path: Path) -> Iterator[UpdateReader]:
    """Open a dense or sparse update for streaming; raises BadTensorFile (BadSparseUpdate)."""
    with tensor_io.open_lazy(path) as lazy:
        yield UpdateReader(lazy)


def load_update(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor densified, and the metadata."""
    with open_update(path) as update:
        return {name: update.get(name) for name in update.names}, update.metadata
