"""POST script of an asynchronous job: apply its update to the global model as soon as it lands.

A POST script rather than a local-universe aggregation job: it runs on the submit host the moment
the job's output is back, with no second trip through the schedd (seconds to minutes on a busy
pool), and without doubling the DAG's node count. Arrivals of different lanes run concurrently;
the ledger lock (async_state) serializes them, so no update is lost or applied twice.

Each arrival is validated against the newest model, weighted by its staleness and put in the
buffer; every `buffer` arrivals (1: at once, FedAsync) the buffer becomes a server-optimizer step
and a new model version (FedBuff). A failed job is retried by DAGMan; after its last try the lane
goes on with its next job, and the update budget it held is given back.
"""

import os
import time
from pathlib import Path
from typing import Any

import torch

from aggregation.async_state import Ledger, job_key, locked
from aggregation.buffers import is_mean, is_variance
from aggregation.job_plan import JobPlan
from aggregation.merge import merge_updates
from aggregation.model_check import BrokenModel, check_next_model
from aggregation.server_optimizer import ServerOptimizer
from aggregation.staleness import staleness_weight
from aggregation.validate import check_file, parse_count, shown, validate_update
from node_payload.common.errors import EXIT_FATAL, UserError
from node_payload.common.model_file import load_model, save_model
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import (
    ASYNC_EVENTS,
    RESIDUAL_FILE,
    UPDATE_FILE,
    lane_dir,
    lane_job_dir,
    model_path,
    server_state_path,
)
from node_payload.common.sparse_update import open_update
from node_payload.common.tensor_io import (
    BadTensorFile,
    load_tensors,
    open_lazy,
    read_metadata,
    save_tensors,
)


def log(run_dir: Path, message: str) -> None:
    """One line on stdout (the POST script's output) and in async/events.log (kept with the run:
    DAGMan does not keep a script's output)."""
    print(message, flush=True)
    with open(run_dir / ASYNC_EVENTS, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def arrive(
    run_dir: Path,
    config: RunConfig,
    lane: int,
    step: int,
    returned: int,
    retry: int,
    max_retries: int,
) -> int:
    """The POST script's exit code: 0 lets the lane go on, the job's code asks for a retry
    (1 for a job killed by a signal, $RETURN -N: the machine killed it, trying again may help;
    -1001 and -1002, never submitted or removed at the deadline or held, are not retried)."""
    where = f"lane {lane} step {step}"
    killed = -1000 < returned < 0
    if (killed or (returned > 0 and returned != EXIT_FATAL)) and retry < max_retries:
        return max(returned, 1)  # an exit code cannot be negative
    try:
        with locked(run_dir) as ledger:
            key = job_key(lane, step)
            if key in ledger.done:
                return 0
            claim = ledger.claims.pop(key, None)
            if returned == 0:
                ledger.done[key] = _accept(run_dir, config, ledger, lane, step, claim)
                log(run_dir, f"{where}: {ledger.done[key]}")
                return 0
            if returned == EXIT_FATAL:
                # Not done: once the cause is fixed, a rescue DAG runs this job again.
                log(
                    run_dir,
                    f"{where}: fatal error, see {lane_job_dir(run_dir, lane, step)}/job.err",
                )
                return EXIT_FATAL
            if killed:
                ledger.done[key] = f"failed {retry + 1} times, last killed by signal {-returned}"
            elif returned < 0:
                ledger.done[key] = f"removed (deadline passed or held; DAGMan code {returned})"
            else:
                ledger.done[key] = f"failed {retry + 1} times, last exit code {returned}"
            log(run_dir, f"{where}: {ledger.done[key]}; the lane goes on with its next job")
            return 0
    except BrokenModel as exc:
        # The ledger is not saved: the arrival never happened, and DAGMan stops the lane.
        log(run_dir, f"{where}: fatal: {exc}")
        return EXIT_FATAL


def _accept(
    run_dir: Path,
    config: RunConfig,
    ledger: Ledger,
    lane: int,
    step: int,
    claim: dict[str, Any] | None,
) -> str:
    """Validate and buffer one update (and step when the buffer is full); says what happened."""
    job_dir = lane_job_dir(run_dir, lane, step)
    if (job_dir / RESIDUAL_FILE).is_file():
        os.replace(job_dir / RESIDUAL_FILE, lane_dir(run_dir, lane) / RESIDUAL_FILE)
    path = job_dir / UPDATE_FILE
    problem = check_file(path)
    if problem:
        return f"rejected: {problem}"
    try:
        text = read_metadata(path).get("base_version")
    except (BadTensorFile, OSError) as exc:
        return f"rejected: {exc}"
    base = parse_count(text, ledger.version)
    if base is None:
        return (
            f"rejected: metadata base_version is {shown(text)}, not a version of the global "
            f"model (0 to {ledger.version})"
        )
    if claim is not None and base != claim["version"]:
        return (
            f"rejected: the update starts from version {base}, its job was given {claim['version']}"
        )
    model, metadata = load_model(model_path(run_dir, ledger.version))
    state = model.state_dict()
    expected = {"round": step, "node": lane, "base_version": base}
    check = validate_update(
        path,
        state,
        step,
        lane,
        config.server.max_update_norm,
        expected,
        plan=JobPlan.from_config(config),
        base=_buffers_of(run_dir, base, state),
    )
    if not check.ok:
        return f"rejected: {check.reason}"
    rules = config.async_
    staleness = ledger.version - base
    weight = staleness_weight(rules.staleness, staleness, rules.staleness_a, rules.staleness_b)
    ledger.buffer.append(
        {
            "lane": lane,
            "step": step,
            "base_version": base,
            "staleness": staleness,
            "weight": weight,
            "samples": check.samples,
        }
    )
    ledger.accepted += 1
    outcome = f"accepted, staleness {staleness}, weight {weight:.3g}"
    if len(ledger.buffer) >= rules.buffer or ledger.accepted >= config.update_budget:
        version = step_version(run_dir, config, ledger, model, metadata)
        outcome += f"; applied as version {version}"
    return outcome


def step_version(
    run_dir: Path,
    config: RunConfig,
    ledger: Ledger,
    model: torch.nn.Module,
    metadata: dict[str, str],
) -> int:
    """Merge the buffer into the next version of `model` (the ledger's current version, as
    loaded by the caller); model and server state are written before the ledger, so a kill in
    between only makes a rerun write the same files again."""
    torch.set_num_threads(1)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    entries = ledger.buffer
    server = config.server
    plan = JobPlan.from_config(config)
    bases = {v: _buffers_of(run_dir, v, global_state) for v in {e["base_version"] for e in entries}}
    merged = merge_updates(
        global_state,
        [
            (i, lane_job_dir(run_dir, e["lane"], e["step"]) / UPDATE_FILE)
            for i, e in enumerate(entries)
        ],
        server.max_update_norm,
        0,
        server.rule,
        server.trim,
        server.clip_norm,
        expected={
            i: {"round": e["step"], "node": e["lane"], "base_version": e["base_version"]}
            for i, e in enumerate(entries)
        },
        scales={i: e["weight"] for i, e in enumerate(entries)},
        plan=plan,
        bases={i: bases[e["base_version"]] for i, e in enumerate(entries)},
    )
    if not merged.accepted:
        raise UserError(
            "every buffered update failed validation on a second read: "
            + "; ".join(merged.rejected.values())
        )
    optimizer = ServerOptimizer.from_config(server)
    optimizer.load_state_dict(*load_tensors(server_state_path(run_dir, ledger.version)))
    param_names = {name for name, _ in model.named_parameters()}
    state = optimizer.step(global_state, merged.mean_update, param_names)
    kept = [entries[i] for i in merged.accepted]
    state |= _mixed_statistics(run_dir, global_state, param_names, kept)
    version = ledger.version + 1
    applied = ", ".join(job_key(e["lane"], e["step"]) for e in kept)
    check_next_model(state, version, plan.steps, f"updates {applied} (lane:step)")
    model.load_state_dict(state)
    save_tensors(server_state_path(run_dir, version), *optimizer.state_dict())
    save_model(model_path(run_dir, version), model, {**metadata, "version": str(version)})
    ledger.versions.append(
        {
            "version": version,
            "at": time.time(),
            "updates": [job_key(e["lane"], e["step"]) for e in entries],
            "staleness": [e["staleness"] for e in entries],
            "clipped": [job_key(entries[i]["lane"], entries[i]["step"]) for i in merged.clipped],
        }
    )
    ledger.version = version
    ledger.buffer = []
    return version


def _mixed_statistics(
    run_dir: Path,
    global_state: dict[str, torch.Tensor],
    params: set[str],
    entries: list[dict[str, Any]],
) -> dict[str, torch.Tensor]:
    """BatchNorm running statistics, mixed rather than stepped: (1 - W) x global + sum of w_i x
    the node's own statistics, w_i = weight_i x samples_i / total samples, W = sum of w_i <= 1.

    A stale update's statistics delta is relative to an old model: subtracting it from the
    newest one can drive a running variance below zero (the model then predicts one class).
    Mixing the nodes' statistics themselves keeps every variance a convex combination of
    variances.
    """
    names = [n for n, t in global_state.items() if n not in params and t.is_floating_point()]
    if not names:
        return {}
    total = sum(e["samples"] for e in entries)
    shares = [e["weight"] * e["samples"] / total for e in entries]
    mixed = {n: global_state[n].double() * (1 - sum(shares)) for n in names}
    for entry, share in zip(entries, shares, strict=True):
        job_dir = lane_job_dir(run_dir, entry["lane"], entry["step"])
        with (
            open_lazy(model_path(run_dir, entry["base_version"])) as base,
            open_update(job_dir / UPDATE_FILE) as update,
        ):
            for n in names:
                mixed[n] += share * (base.get(n).double() - update.get(n).double())
    return {n: mixed[n].to(global_state[n].dtype) for n in names}


def flush(run_dir: Path, config: RunConfig) -> None:
    """Apply what is left in the buffer when the lanes have ended (the FINAL node calls this);
    a step that would break the model is logged and not applied, and the report goes on."""
    try:
        with locked(run_dir) as ledger:
            if ledger.buffer:
                model, metadata = load_model(model_path(run_dir, ledger.version))
                version = step_version(run_dir, config, ledger, model, metadata)
                log(
                    run_dir,
                    f"the last {len(ledger.versions[-1]['updates'])} buffered updates: "
                    f"version {version}",
                )
    except BrokenModel as exc:
        log(run_dir, f"the last buffered updates: {exc}")


def _buffers_of(
    run_dir: Path, version: int, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The running statistics and integer tensors of model `version`: what an update that
    started from it is checked against (aggregation.buffers)."""
    with open_lazy(model_path(run_dir, version)) as model:
        return {
            name: model.get(name)
            for name, tensor in state.items()
            if is_mean(name) or is_variance(name) or not tensor.is_floating_point()
        }
