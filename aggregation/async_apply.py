"""POST script of an asynchronous job: apply its update to the global model as soon as it lands.

A POST script rather than a local-universe aggregation job: it runs on the submit host the moment
the job's output is back, with no second trip through the schedd (seconds to minutes on a busy
pool), and without doubling the DAG's node count. Arrivals of different lanes run concurrently;
the ledger lock (async_state) serializes them, so no update is lost or applied twice.

What becomes of the job (accepted, retried, missing, fatal) is the policy every node job's POST
script follows (aggregation.node_outcome). An accepted update is validated against the newest
model, weighted by its staleness and put in the buffer; every `buffer` arrivals (1: at once,
FedAsync) the buffer goes through the aggregation step (aggregation.aggregator) and becomes a new
model version (FedBuff). After a job's last try the lane goes on with its next job, and the
update budget it held is given back.
"""

import time
from pathlib import Path
from typing import Any

import torch

from aggregation.aggregator import Aggregator, GlobalModel, Offered
from aggregation.async_state import Ledger, job_key, locked
from aggregation.model_check import BrokenModel
from aggregation.node_outcome import Verdict, decide
from aggregation.publish import publish_model
from aggregation.tensorboard_log import log_version
from aggregation.validate import check_file, parse_count, shown
from node_payload.common.errors import EXIT_FATAL, UserError
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import ASYNC_EVENTS, UPDATE_FILE, lane_job_dir
from node_payload.common.tensor_io import BadTensorFile, read_metadata


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
    """The POST script's exit code: 0 lets the lane go on, the job's code asks for a retry,
    EXIT_FATAL stops the lane."""
    where = f"lane {lane} step {step}"
    outcome = decide(returned, retry, max_retries, lane_job_dir(run_dir, lane, step))
    if outcome.verdict is Verdict.RETRY:
        return outcome.exit_code
    try:
        with locked(run_dir) as ledger:
            key = job_key(lane, step)
            if key in ledger.done:
                return 0
            claim = ledger.claims.pop(key, None)
            if outcome.verdict is Verdict.FATAL:
                # Not done: once the cause is fixed, a rescue DAG runs this job again.
                log(run_dir, f"{where}: {outcome.reason}")
            elif outcome.verdict is Verdict.MISSING:
                ledger.done[key] = outcome.reason
                log(run_dir, f"{where}: {outcome.reason}; the lane goes on with its next job")
            else:
                ledger.done[key] = _accept(run_dir, config, ledger, lane, step, claim)
                log(run_dir, f"{where}: {ledger.done[key]}")
            return outcome.exit_code
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
    aggregator = Aggregator(run_dir, config)
    current = aggregator.load(ledger.version)
    staleness = ledger.version - base
    entry = {"lane": lane, "step": step, "base_version": base, "staleness": staleness}
    entry["weight"] = aggregator.staleness_weight(staleness)
    check = aggregator.check(current, _offered(run_dir, 0, entry))
    if not check.ok:
        return f"rejected: {check.reason}"
    ledger.buffer.append(entry | {"samples": check.samples})
    ledger.accepted += 1
    outcome = f"accepted, staleness {staleness}, weight {entry['weight']:.3g}"
    if len(ledger.buffer) >= config.async_.buffer or ledger.accepted >= config.update_budget:
        version = step_version(aggregator, config, ledger, current)
        outcome += f"; applied as version {version}"
    return outcome


def step_version(
    aggregator: Aggregator, config: RunConfig, ledger: Ledger, current: GlobalModel
) -> int:
    """The buffer through the aggregation step into the version after `current` (the ledger's
    version); model, server state and the model's publication come before the ledger, so a kill
    in between only makes a rerun write the same files again, and a claim of the version always
    finds it published."""
    torch.set_num_threads(1)
    entries = ledger.buffer
    offered = [_offered(aggregator.run_dir, i, e) for i, e in enumerate(entries)]
    merged = aggregator.merge(current, offered)
    if not merged.accepted:
        raise UserError(
            "every buffered update failed validation on a second read: "
            + "; ".join(merged.rejected.values())
        )
    applied = ", ".join(job_key(entries[i]["lane"], entries[i]["step"]) for i in merged.accepted)
    version = aggregator.advance(current, merged, f"updates {applied} (lane:step)").version
    publish_model(aggregator.run_dir, config, version)
    made = {
        "version": version,
        "at": time.time(),
        "updates": [job_key(e["lane"], e["step"]) for e in entries],
        "staleness": [e["staleness"] for e in entries],
        "clipped": [job_key(entries[i]["lane"], entries[i]["step"]) for i in merged.clipped],
    }
    previous = ledger.versions[-1]["at"] if ledger.versions else ledger.started_at
    log_version(
        aggregator.run_dir,
        made,
        made["at"] - (previous or made["at"]),
        len(merged.accepted),
        sum(offered[i].path.stat().st_size for i in merged.accepted),
    )
    ledger.versions.append(made)
    ledger.version = version
    ledger.buffer = []
    return version


def _offered(run_dir: Path, index: int, entry: dict[str, Any]) -> Offered:
    """A buffered update (or an arrival about to be), keyed by its place in the buffer."""
    lane, step, base = entry["lane"], entry["step"], entry["base_version"]
    return Offered(
        index,
        lane_job_dir(run_dir, lane, step) / UPDATE_FILE,
        {"round": step, "node": lane, "base_version": base},
        base,
        entry["weight"],
    )


def flush(run_dir: Path, config: RunConfig) -> None:
    """Apply what is left in the buffer when the lanes have ended (the FINAL node calls this);
    a step that would break the model is logged and not applied, and the report goes on."""
    try:
        with locked(run_dir) as ledger:
            if ledger.buffer:
                aggregator = Aggregator(run_dir, config)
                current = aggregator.load(ledger.version)
                version = step_version(aggregator, config, ledger, current)
                log(
                    run_dir,
                    f"the last {len(ledger.versions[-1]['updates'])} buffered updates: "
                    f"version {version}",
                )
    except BrokenModel as exc:
        log(run_dir, f"the last buffered updates: {exc}")
