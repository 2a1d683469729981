"""A node job writes its update the way `[compression] method` says (node_payload.update_methods):
a method that holds values back starts from the lane's residual on this machine and leaves the
next one there (node_payload.residual_cache)."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# Imported for their registrations: the methods the config may name.
import node_payload.dgc
import node_payload.quantise  # noqa: F401
from node_payload.common import tensor_io
from node_payload.common.job_bytes import Moved
from node_payload.common.run_config import RunConfig
from node_payload.residual_cache import Residual, load, run_cache, save
from node_payload.update_methods import METHODS, error_fed_names


def write_update(
    update: Mapping[str, torch.Tensor],
    params: set[str],
    config: RunConfig,
    metadata: Mapping[str, str],
    lane: int,
    step: int,
    path: Path,
) -> tuple[dict[str, Any], Moved]:
    """Write the update file at path; returns what metrics.json adds (update_bytes, how the
    residual was found, the method's own figures) and the residual's bytes read and written on
    this machine."""
    method = METHODS[config.compression.method]
    if not config.compressed:
        encoded = method(update, params, Residual(), config.compression, step)
        tensor_io.save_tensors(path, encoded.tensors, {**metadata, **encoded.metadata})
        return {"update_bytes": path.stat().st_size}, Moved()
    run_id = config.run.run_id
    folder = run_cache(config.data.node_cache, run_id)
    reference = {n: update[n] for n in error_fed_names(update, params)}
    momentum = config.compression.momentum if config.compression.method == "dgc" else 0.0
    found = load(folder, run_id, lane, step, reference, momentum)
    encoded = method(update, params, found.residual, config.compression, step)
    tensor_io.save_tensors(path, encoded.tensors, {**metadata, **encoded.metadata})
    after = encoded.residual or Residual()  # every compressing method keeps one
    written = save(folder, after, run_id, lane, step)
    metrics = {
        "update_bytes": path.stat().st_size,
        "residual": found.how,
        "residual_step": found.step,
        "residual_jobs": after.jobs,
        **encoded.metrics,
    }
    return metrics, Moved(residual_in=found.bytes, residual_out=written)
