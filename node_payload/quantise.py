"""Quantised dense updates with error feedback: `[compression] method = "fp16"` or `"int8"`.

Every value of the update is sent, rounded: to float16 (half the bytes of float32) or to int8
with one scale per tensor (a quarter). What the rounding loses on a float32 parameter tensor
is kept in the lane's residual, on the execute machine (node_payload.residual_cache), and
added to the lane's next update, so that no small steady change is rounded away job after
job. BatchNorm statistics travel in float16 without feedback (they are averaged, not summed);
`[compression] clip_norm` scales the parameters down first, as for DGC. The file format is
node_payload.common.quantised_update.
"""

from collections.abc import Mapping

import torch

from node_payload.common import quantised_update
from node_payload.common.run_config import CompressionTable
from node_payload.residual_cache import Residual
from node_payload.update_methods import METHODS, Encoded, clip_scale, error_fed_names, update_norm


def quantise(
    update: Mapping[str, torch.Tensor],
    params: set[str],
    residual: Residual,
    clip_norm: float,
    method: str,
) -> Encoded:
    """One job's quantised update and the lane's next residual; the inputs are left untouched."""
    names = error_fed_names(update, params)
    scale = clip_scale(update, names, clip_norm)
    after = Residual(jobs=residual.jobs + 1)
    plain = {n: t for n, t in update.items() if n not in names}
    int8 = {}
    for name in names:
        value = update[name] * scale
        if name in residual.v:
            value = value + residual.v[name]
        if method == "int8":
            q, q_scale = quantised_update.to_int8(value)
            int8[name] = (q, q_scale)
            sent = quantised_update.from_int8(q, q_scale)
        else:
            plain[name] = value
            sent = quantised_update.to_half(value).float()
        after.v[name] = value - sent
    tensors = quantised_update.encode(plain, int8)
    metrics = {"update_norm_before_clip": update_norm(update, names)}
    return Encoded(tensors, {"compression": method}, after, metrics)


@METHODS.register("fp16")
def fp16(
    update: Mapping[str, torch.Tensor],
    params: set[str],
    residual: Residual,
    table: CompressionTable,
    step: int,
) -> Encoded:
    """Every tensor in float16: half a dense update's bytes."""
    return quantise(update, params, residual, table.clip_norm, "fp16")


@METHODS.register("int8")
def int8(
    update: Mapping[str, torch.Tensor],
    params: set[str],
    residual: Residual,
    table: CompressionTable,
    step: int,
) -> Encoded:
    """Parameters in int8 with a scale per tensor: a quarter of a dense update's bytes."""
    return quantise(update, params, residual, table.clip_norm, "int8")
