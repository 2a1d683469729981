"""A held-out cache file: written by the run itself, still read as untrusted.

A cache outlives the job that wrote it (a full disk, a hand edit, a file copied from another run),
and a wrong tensor there would mis-score every later evaluation without a word. So a cache is used
only when it holds exactly the expected tensors: the names, dtypes and shapes, finite values, and
the labels the manifest gives. Anything else is named on the job's output and fetched again.
Read as safetensors only: a pickle is never loaded.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from node_payload.common.errors import UserError
from node_payload.common.tensor_io import BadTensorFile, load_tensors, save_tensors

# Room for the safetensors header (names, shapes, offsets, metadata) beyond the tensor bytes.
_HEADER_BYTES = 1 << 20


@dataclass(frozen=True)
class Expected:
    """What a cache file must hold: tensor name -> (shape, dtype), the metadata exactly, and
    the tensors whose values are known in advance (labels, from the manifest)."""

    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
    metadata: dict[str, str]
    values: dict[str, torch.Tensor]

    def most_bytes(self) -> int:
        data = sum(
            torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            for shape, dtype in self.shapes.values()
        )
        return data + _HEADER_BYTES


class BadCache(ValueError):
    """The cache file exists but is not the expected tensors; the message says why."""


def read_cache(path: Path, expected: Expected) -> dict[str, torch.Tensor]:
    """The cache's tensors; BadCache when they are not exactly what `expected` describes."""
    size = path.stat().st_size
    if size > expected.most_bytes():
        raise BadCache(
            f"it is {size} bytes, more than the {expected.most_bytes()} its tensors take"
        )
    try:
        tensors, metadata = load_tensors(path)
    except BadTensorFile as err:
        raise BadCache(str(err)) from None
    if metadata != expected.metadata:
        raise BadCache(f"its metadata is {metadata}, expected {expected.metadata}")
    if tensors.keys() != expected.shapes.keys():
        raise BadCache(f"it holds tensors {sorted(tensors)}, expected {sorted(expected.shapes)}")
    for name, (shape, dtype) in expected.shapes.items():
        tensor = tensors[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise BadCache(
                f"{name} is {tensor.dtype} of shape {tuple(tensor.shape)}, "
                f"expected {dtype} of shape {shape}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BadCache(f"{name} holds NaN or infinite values")
    for name, value in expected.values.items():
        if not torch.equal(tensors[name], value):
            raise BadCache(f"{name} differs from the labels the dataset manifest gives")
    return tensors


def cached(
    path: Path, expected: Expected, fetch: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The cache's tensors when they are sound; otherwise fetched, saved over it and returned."""
    if path.is_file():
        try:
            return read_cache(path, expected)
        except BadCache as problem:
            print(f"{path}: not used ({problem}); fetching the held-out set again", flush=True)
    elif path.exists() or path.is_symlink():
        raise UserError(
            f"{path} is not a regular file; remove it and the next evaluation fetches the "
            "held-out set again"
        )
    tensors = fetch()
    save_tensors(path, tensors, expected.metadata)
    return tensors
