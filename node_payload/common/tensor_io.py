"""safetensors files for models, updates and optimizer state.

Tensors cross machine boundaries (execute node -> submit host), so they are only ever read as
safetensors: a pickle or torch.save file could run arbitrary code when loaded and is refused.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from node_payload.common.atomic_file import replacing

MODEL_FORMAT = "dagtrain-model/1"
UPDATE_FORMAT = "dagtrain-update/1"
RESIDUAL_FORMAT = "dagtrain-residual/1"

_PICKLE_PROTOCOLS = frozenset(range(2, 6))


class BadTensorFile(ValueError):
    """The file exists but is not a readable safetensors file."""


class LazyTensors:
    """An open safetensors file that hands out one tensor at a time, to keep memory O(tensor)."""

    def __init__(self, handle: Any, metadata: dict[str, str]) -> None:
        self._handle = handle
        self.metadata = metadata
        self.names: list[str] = list(handle.keys())

    def get(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically: readers (DAGMan retries, a resumed run) see the old file or the new one."""
    with replacing(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "r+b") as f:
            _sort_metadata(f)


def _sort_metadata(f: BinaryIO) -> None:
    """Rewrite the header with its metadata keys sorted, in place and at the same length.

    safetensors writes metadata in hash-map order, which changes from process to process; equal
    tensors must give equal bytes (a rerun, a resumed run, a pool run and a local run).
    """
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
    if "__metadata__" not in header:
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:
        raise ValueError(f"sorted safetensors header is {len(text)} bytes, not at most {size}")
    f.seek(8)
    f.write(text.ljust(size, b" "))


def _not_safetensors(path: Path, cause: Exception) -> BadTensorFile:
    with open(path, "rb") as f:
        head = f.read(2)
    pickled = len(head) == 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS
    if pickled or head == b"PK":
        return BadTensorFile(
            f"{path} is a pickle / torch.save file, not a safetensors file; pickles are refused "
            "because loading them can execute arbitrary code (write it with safetensors instead)"
        )
    return BadTensorFile(f"{path} is not a safetensors file (truncated or corrupt?): {cause}")


@contextmanager
def open_lazy(path: Path) -> Iterator[LazyTensors]:
    """Open for streaming; raises BadTensorFile for anything that is not valid safetensors."""
    path = Path(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as err:
        raise _not_safetensors(path, err) from None
    with handle:
        yield LazyTensors(handle, dict(handle.metadata() or {}))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor and the metadata of a file."""
    with open_lazy(path) as f:
        return {name: f.get(name) for name in f.names}, f.metadata


def read_metadata(path: Path) -> dict[str, str]:
    """Metadata only; the tensor data is memory-mapped and never read."""
    with open_lazy(path) as f:
        return f.metadata


def model_metadata(
    version: int, arch: str, num_classes: int, in_channels: int, image_size: int
) -> dict[str, str]:
    """Metadata of global_rRRR.safetensors: enough to rebuild the network without the config."""
    return {
        "format": MODEL_FORMAT,
        "version": str(version),
        "arch": arch,
        "num_classes": str(num_classes),
        "in_channels": str(in_channels),
        "image_size": str(image_size),
    }


def update_metadata(round_: int, node: int, samples: int, base_version: int) -> dict[str, str]:
    """Metadata of update.safetensors: the aggregator weights by samples and checks the rest."""
    return {
        "format": UPDATE_FORMAT,
        "round": str(round_),
        "node": str(node),
        "samples": str(samples),
        "base_version": str(base_version),
    }


def residual_metadata(run_id: str, lane: int, jobs: int, round_: int) -> dict[str, str]:
    """Metadata of residual.safetensors: which run and lane it belongs to, how many jobs it
    has seen (the compression warm-up) and the round or step of the job that wrote it."""
    return {
        "format": RESIDUAL_FORMAT,
        "run_id": run_id,
        "lane": str(lane),
        "jobs": str(jobs),
        "round": str(round_),
    }
