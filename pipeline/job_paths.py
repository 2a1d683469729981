"""Where each job's files are, as its submit file names them.

Paths come from the run layout with the DAG's VARS macros ($(rtag) $(ntag) $(ltag) $(jtag))
where the numbers go; a node job's inputs are made relative to its initialdir here, in one
place, so no template or module spells out how deep a job's folder is.
"""

import posixpath
from dataclasses import dataclass

from aggregation.async_claim import model_input
from node_payload.common.run_config import RunConfig
from node_payload.common.run_layout import (
    CONFIG_FILE,
    ENV_WRAPPER,
    LANES_DIR,
    METRICS_FILE,
    MODELS_DIR,
    PAYLOAD_DIR,
    ROUNDS_DIR,
    UPDATE_FILE,
    global_model_name,
    global_pointer_name,
)
from pipeline.payload_zip import LAUNCHER, PAYLOAD_NAME

PAYLOAD = f"{PAYLOAD_DIR}/{PAYLOAD_NAME}"
ROUND_DIR = f"{ROUNDS_DIR}/$(rtag)"  # a round's folder: its aggregation job's logs


@dataclass(frozen=True)
class NodeJobFiles:
    """A node job's folder and files. Its inputs arrive in its scratch folder under their base
    names, which its arguments use."""

    initialdir: str  # relative to the run directory
    inputs: tuple[str, ...]  # relative to initialdir, or absolute
    wrapper: str  # the env_tarball wrapper, relative to initialdir
    payload: str  # the job payload in its scratch folder
    model: str  # the global model it trains (or its pointer), in its scratch folder
    outputs: tuple[str, ...]  # what it returns to initialdir from its scratch folder
    tarball: str  # the env_tarball in its scratch folder ("" without one)


def node_job_files(config: RunConfig) -> NodeJobFiles:
    """Synchronous jobs take the round's model from the run directory (a lane's residual stays
    on the execute machines: node_payload/residual_cache.py);
    an asynchronous job's PRE script puts it in the job's own folder. When the mirrors serve
    the run's models, a job gets the model's pointer instead (aggregation/publish.py), and the
    payload's launcher instead of the payload (pipeline/payload_launcher.py)."""
    if config.is_async:
        initialdir = f"{LANES_DIR}/$(ltag)/$(jtag)"
        model = f"{initialdir}/{model_input(config)}"
    else:
        initialdir = f"{ROUND_DIR}/$(ntag)"
        name = global_pointer_name if config.models_from_mirrors else global_model_name
        model = f"{MODELS_DIR}/{name('$(rtag)')}"
    payload = LAUNCHER if config.models_from_mirrors else PAYLOAD
    from_run = [payload, CONFIG_FILE, model]
    inputs = [posixpath.relpath(path, initialdir) for path in from_run]
    if config.execution.env_tarball:
        inputs.append(config.execution.env_tarball)
    return NodeJobFiles(
        initialdir=initialdir,
        inputs=tuple(inputs),
        wrapper=posixpath.relpath(ENV_WRAPPER, initialdir),
        payload=PAYLOAD_NAME,
        model=posixpath.basename(model),
        outputs=(UPDATE_FILE, METRICS_FILE),
        tarball=posixpath.basename(config.execution.env_tarball),
    )
