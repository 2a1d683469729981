"""`[compression] method`: how a node job writes its update, by name.

Each method is a function registered in METHODS (`@METHODS.register("name")`): from the update
(global minus local weights), the names of the model's parameters, the lane's residual, the
[compression] table and the lane's step, it makes the update file's tensors and metadata and the
lane's next residual (None: the method keeps none). "none" is here; "dgc" in node_payload.dgc,
"fp16" and "int8" in node_payload.quantise. The config's allowed values are the registered
names (aggregation.choices), and node_payload.compression runs the chosen one.
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from node_payload.common.registry import Registry
from node_payload.common.run_config import CompressionTable
from node_payload.residual_cache import Residual


@dataclass(frozen=True)
class Encoded:
    """One job's update file (its tensors and the metadata its method adds), the lane's next
    residual, and the figures the method adds to metrics.json."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    residual: Residual | None
    metrics: dict[str, Any] = field(default_factory=dict)


Method = Callable[[Mapping[str, torch.Tensor], set[str], Residual, CompressionTable, int], Encoded]
METHODS: Registry[Method] = Registry("update_compression", "[compression] method")


def error_fed_names(update: Mapping[str, torch.Tensor], params: set[str]) -> list[str]:
    """The tensors a compressing method sends with error feedback: the float32 parameters.
    BatchNorm statistics are averaged whole and counters are not gradients."""
    return [n for n, t in update.items() if n in params and t.dtype == torch.float32]


def clip_scale(update: Mapping[str, torch.Tensor], names: list[str], clip_norm: float) -> float:
    """The factor that brings the named tensors' joint L2 norm down to clip_norm (0: off)."""
    norm = update_norm(update, names)
    return clip_norm / norm if 0 < clip_norm < norm else 1.0


def update_norm(update: Mapping[str, torch.Tensor], names: list[str]) -> float:
    squares = sum(
        torch.linalg.vector_norm(update[n], dtype=torch.float64).item() ** 2 for n in names
    )
    return math.sqrt(squares)


@METHODS.register("none")
def dense(
    update: Mapping[str, torch.Tensor],
    params: set[str],
    residual: Residual,
    table: CompressionTable,
    step: int,
) -> Encoded:
    """Every tensor as trained (float32 parameters): nothing held back, no residual."""
    return Encoded(dict(update), {}, None)
