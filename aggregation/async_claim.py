"""PRE script of an asynchronous job: hand it the newest global model, or skip it.

Runs on the submit host right before DAGMan submits the job, so the job starts from the newest
version there is at that moment (the staleness the POST script measures counts the versions
applied while the job queued and ran). A job is skipped (DAGMan PRE_SKIP: the node counts as
done without running) once the update budget is spoken for or the time budget has passed. Each
later job of the lane asks again (a skip takes milliseconds), so budget that a failed job gives
back goes to whichever lane asks next. When the mirrors serve the run's models, the job is
given the version's pointer instead of the model, and fetches the model itself.
"""

import os
import shutil
import time
from pathlib import Path

from aggregation.async_state import job_key, locked
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import (
    lane_job_dir,
    model_path,
    model_pointer_path,
)

EXIT_SKIP = 99  # the DAG's PRE_SKIP code: any other non-zero exit is a failed PRE script
MODEL_INPUT = "global.safetensors"  # the names the job's submit file transfers: the model,
POINTER_INPUT = "global.json"  # or its pointer when the mirrors serve the run's models


def model_input(config: RunConfig) -> str:
    """The name of the model (or its pointer) in an asynchronous job's folder."""
    return POINTER_INPUT if config.models_from_mirrors else MODEL_INPUT


def claim(run_dir: Path, config: RunConfig, lane: int, step: int) -> int:
    """0 when the job may run (its model is in place), EXIT_SKIP when it must not."""
    key = job_key(lane, step)
    with locked(run_dir) as ledger:
        now = time.time()
        if ledger.started_at is None:
            ledger.started_at = now
        if key in ledger.done:
            why = f"already finished ({ledger.done[key]})"
        elif ledger.accepted + ledger.in_flight() - (key in ledger.claims) >= config.update_budget:
            why = "the update budget is spoken for"
        elif 0 < config.async_.time_budget_s < ledger.elapsed(now):
            why = f"the time budget of {config.async_.time_budget_s} s has passed"
        else:
            ledger.claims[key] = {"version": ledger.version, "at": now}
            _place_inputs(run_dir, config, lane, step, ledger.version)
            print(f"lane {lane} step {step}: starts from version {ledger.version}", flush=True)
            return 0
    print(f"lane {lane} step {step}: skipped, {why}", flush=True)
    return EXIT_SKIP


def _place_inputs(run_dir: Path, config: RunConfig, lane: int, step: int, version: int) -> None:
    """Link the model or its pointer (never written back).
    A lane's residual stays on the execute machines (node_payload/residual_cache.py)."""
    job_dir = lane_job_dir(run_dir, lane, step)
    job_dir.mkdir(parents=True, exist_ok=True)
    source = (
        model_pointer_path(run_dir, version)
        if config.models_from_mirrors
        else model_path(run_dir, version)
    )
    target = job_dir / model_input(config)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
