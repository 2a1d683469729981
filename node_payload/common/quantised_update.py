"""Quantised dense update files: every value sent, in fewer bits (`[compression] method` fp16
or int8), a cheaper alternative to top-k.

An update file (format dagtrain-update/1) whose metadata says `compression = "fp16"` or
`"int8"` holds each model tensor under its own name:

- fp16: float32 tensors as float16, clamped to its range (+-65504);
- int8: float32 parameter tensors as int8 q with a float32 scalar `NAME::scale`, the tensor
  being q x scale (symmetric, one scale per tensor: max |value| / 127); the float32 tensors that
  are not parameters (BatchNorm statistics) as float16;
- any other tensor (integer counters) as it is.

The node keeps what the rounding lost in its lane's residual (node_payload.quantise). Readers
get float32 back from float16 and int8 tensors; every scale is checked (a float32 scalar,
finite, >= 0, beside an int8 tensor) when the file is opened, and the values are then checked
by validation like a dense update's (dtype and shape against the model, finite).
"""

from collections.abc import Mapping

import torch

from node_payload.common import tensor_io

METHODS = ("fp16", "int8")
SCALE = "::scale"  # "::" cannot occur in a PyTorch tensor name
MAX_HALF = 65504.0


def to_half(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clamp(-MAX_HALF, MAX_HALF).half()


def to_int8(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (int8, in -127..127) and the float32 scalar scale with q x scale nearest to tensor."""
    largest = tensor.abs().max() if tensor.numel() else torch.tensor(0.0)
    scale = (largest / 127).to(torch.float32)
    if scale == 0:
        return torch.zeros_like(tensor, dtype=torch.int8), scale
    return torch.round(tensor / scale).clamp(-127, 127).to(torch.int8), scale


def from_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale


def encode(
    update: Mapping[str, torch.Tensor], int8: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The file's tensors: int8 ones with their scales, float32 ones in float16, others as they
    are. update holds every tensor that is not in int8."""
    tensors = {}
    for name, tensor in update.items():
        tensors[name] = to_half(tensor) if tensor.dtype == torch.float32 else tensor
    for name, (q, scale) in int8.items():
        tensors[name] = q
        tensors[name + SCALE] = scale
    return tensors


class QuantisedReader:
    """A quantised update seen as dense tensors, handed out one at a time (the interface of
    sparse_update.UpdateReader, with nothing sparse)."""

    def __init__(self, lazy: tensor_io.LazyTensors, method: str) -> None:
        self.metadata = lazy.metadata
        self._lazy = lazy
        self.names = [name for name in lazy.names if not name.endswith(SCALE)]
        self._scales: dict[str, torch.Tensor] = {}
        present = set(lazy.names)
        for name in lazy.names:
            if not name.endswith(SCALE):
                continue
            of = name.removesuffix(SCALE)
            if method != "int8" or of not in present:
                raise tensor_io.BadTensorFile(
                    f"tensor {name!r} scales no int8 tensor of this {method} update"
                )
            scale = lazy.get(name)
            if scale.dtype != torch.float32 or scale.dim() != 0:
                raise tensor_io.BadTensorFile(
                    f"scale {name!r} is {scale.dtype} of shape {tuple(scale.shape)}, expected a "
                    "float32 scalar"
                )
            if not torch.isfinite(scale) or scale < 0:
                raise tensor_io.BadTensorFile(
                    f"scale {name!r} is {scale.item()}, expected a finite number >= 0"
                )
            self._scales[of] = scale

    def is_sparse(self, name: str) -> bool:
        return False

    def get(self, name: str) -> torch.Tensor:
        """float16 and int8 (scaled) tensors as float32, others as stored."""
        tensor = self._lazy.get(name)
        if name in self._scales:
            if tensor.dtype != torch.int8:
                raise tensor_io.BadTensorFile(
                    f"tensor {name!r} has a scale but is {tensor.dtype}, expected torch.int8"
                )
            return from_int8(tensor, self._scales[name])
        if tensor.dtype == torch.int8:
            raise tensor_io.BadTensorFile(f"int8 tensor {name!r} has no scale {name + SCALE!r}")
        return tensor.float() if tensor.dtype == torch.float16 else tensor
