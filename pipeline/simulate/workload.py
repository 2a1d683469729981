"""What a planned run asks of a pool: its DAG, its resolved config and each job's bytes and steps.

The run is planned by the real planner into a temporary directory and its DAG read back by the
local runner's parser, so the simulation runs exactly the DAG (retries, POST and PRE scripts,
PRE_SKIP, categories, MAXJOBS, FINAL) a pool would run. A job's bytes are counted by kind and
way as `node_payload/common/job_bytes.py` counts a real job's: the payload, config and model (or
its pointer) through the submit host, the training data (and the model, when the mirrors serve
it) from the mirrors, the update back through the submit host.
"""

import tempfile
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

from node_payload.common.job_bytes import JobBytes, Moved
from node_payload.common.manifest import Manifest
from node_payload.common.run_config import RunConfig, read_run_config
from node_payload.common.run_layout import CONFIG_FILE, DAG_FILE, model_path, model_pointer_path
from node_payload.sampling import local_sets, node_seed
from node_payload.train import steps_for
from pipeline.config import ConfigFile
from pipeline.dag.model import Dag
from pipeline.local_runner.dag_file import parse_dag
from pipeline.planner import make_plan, write

_SAMPLED_JOBS = 8  # local sets drawn to measure a job's data bytes (their sizes hardly differ)
_PAYLOAD = Path("payload") / "dagtrain.pyz"


@dataclass(frozen=True)
class Workload:
    dag: Dag
    config: RunConfig
    job_bytes: JobBytes  # one node job's bytes by kind and way
    steps: int  # SGD steps of one node job
    update_bytes: int  # what an aggregation merges per accepted update


def _update_ratio(config: RunConfig) -> float:
    """An update's size against the dense model's, by compression method (about: DGC keeps a
    value in about 3 bytes, sparse_update.py; fp16 halves, int8 quarters a float32 value)."""
    method = config.compression.method
    if method == "dgc":
        return (1 - config.compression.sparsity) * 3 / 4
    return {"fp16": 0.5, "int8": 0.25}.get(method, 1.0)


def _data_bytes(config: RunConfig) -> int:
    """A job's training and test blocks, as its own sampling draws them (a few jobs' mean)."""
    manifest = Manifest.load(Path(config.data.dataset) / "manifest.json")
    data = config.data
    sizes = []
    for node in range(min(config.run.nodes, _SAMPLED_JOBS)):
        seed = node_seed(config.run.seed, 0, node)
        train, test = local_sets(manifest, seed, data.local_train, data.local_test)
        sizes.append(sum(block.length for block in manifest.blocks_under(train + test)))
    return round(fmean(sizes))


def job_bytes(run_dir: Path, config: RunConfig) -> tuple[JobBytes, int]:
    """One node job's bytes, and an update's, from the files the planner wrote."""
    model = model_path(run_dir, 0).stat().st_size
    payload = (run_dir / _PAYLOAD).stat().st_size + (run_dir / CONFIG_FILE).stat().st_size
    update = round(model * _update_ratio(config))
    data = _data_bytes(config)
    if config.models_from_mirrors:
        pointer = model_pointer_path(run_dir, 0).stat().st_size
        submit = Moved(model_in=pointer, payload_in=payload, update_out=update)
        mirrors = Moved(model_in=model, data_in=data)
    else:
        submit = Moved(model_in=model, payload_in=payload, update_out=update)
        mirrors = Moved(data_in=data)
    return JobBytes(through_submit_host=submit, from_mirrors=mirrors), update


def plan_workload(source: ConfigFile) -> Workload:
    """Plan `source` into a temporary run directory and read back what the planner wrote."""
    with tempfile.TemporaryDirectory(prefix="dagtrain-simulate-") as tmp:
        run_dir = write(make_plan(source), Path(tmp) / "run")
        config = read_run_config(run_dir / CONFIG_FILE)
        moved, update = job_bytes(run_dir, config)
        train = config.train
        steps = steps_for(
            train.local_steps, train.local_epochs, config.data.local_train, train.batch_size
        )
        return Workload(parse_dag(run_dir / DAG_FILE), config, moved, steps, update)
