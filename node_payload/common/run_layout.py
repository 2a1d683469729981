"""Names and paths inside a run directory, in one place for the planner, runner and reports."""

import re
from pathlib import Path

DAG_FILE = "dagtrain.dag"
STATUS_FILE = "dagtrain.dag.status"
CONFIG_FILE = "config.toml"
HELDOUT_FILE = "data/heldout.json"
# The held-out tensors, fetched once by the first evaluation: the fragments of HELDOUT_FILE, and
# the unrotated fragments that vote for each held-out image's class.
HELDOUT_CACHE = "data/heldout_cache.safetensors"
HELDOUT_IMAGES_CACHE = "data/heldout_images.safetensors"
REPORT_FILE = "report.json"
PLOT_FILE = "accuracy.png"
CONFUSION_PLOT_FILE = "confusion.png"
# TensorBoard event files, one per aggregation (aggregation/tensorboard_log.py).
TENSORBOARD_DIR = "tensorboard"
# In a node job's folder (rounds/rNNN/nMMM, lanes/lLLL/jJJJJ): what it returns, its error log,
# and the mark its POST script leaves when it returned nothing.
UPDATE_FILE = "update.safetensors"
METRICS_FILE = "metrics.json"
JOB_ERR = "job.err"
MISSING_MARK = "MISSING"
# Folders and the files the planner writes into them; the DAG and the submit files name these.
ROUNDS_DIR = "rounds"
LANES_DIR = "lanes"
MODELS_DIR = "models"
PAYLOAD_DIR = "payload"
SCRIPTS_DIR = "scripts"
NODE_SUBMIT = "submit/node.sub"
AGGREGATE_SUBMIT = "submit/aggregate.sub"
REPORT_SUBMIT = "submit/report.sub"
NODE_POST_SCRIPT = f"{SCRIPTS_DIR}/node_post.sh"
LANE_SCRIPT = f"{SCRIPTS_DIR}/lane.sh"
ENV_WRAPPER = f"{SCRIPTS_DIR}/run_in_env.sh"


def round_tag(round_: int) -> str:
    return f"r{round_:03d}"


def node_tag(node: int) -> str:
    return f"n{node:03d}"


def round_nodes(round_: int) -> str:
    """A round's node folders (node_tag) as a shell pattern, for messages that send the user
    there."""
    return f"{ROUNDS_DIR}/{round_tag(round_)}/n*"


def node_name(round_: int, node: int) -> str:
    return f"train_{round_tag(round_)}_{node_tag(node)}"


def round_and_node(name: str) -> tuple[int, int] | None:
    """The round and node of a node job's DAG name (node_name), None for any other name."""
    match = re.fullmatch(r"train_r(\d{3,})_n(\d{3,})", name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def aggregate_name(round_: int) -> str:
    return f"aggregate_{round_tag(round_)}"


def round_dir(run_dir: Path, round_: int) -> Path:
    return run_dir / ROUNDS_DIR / round_tag(round_)


def node_dir(run_dir: Path, round_: int, node: int) -> Path:
    return round_dir(run_dir, round_) / node_tag(node)


def make_node_dirs(run_dir: Path, round_: int, nodes: int) -> None:
    """A round's node-job folders, their initialdirs, which must exist when DAGMan submits the
    round: the planner makes round 0's and each round's aggregation the next round's, so that
    planning costs files per round, not per job (an asynchronous job's PRE script makes its own)."""
    for node in range(nodes):
        node_dir(run_dir, round_, node).mkdir(parents=True, exist_ok=True)


def global_model_name(tag: str) -> str:
    """A global model's file name from its version's tag (or the $(rtag) of a submit file)."""
    return f"global_{tag}.safetensors"


def model_path(run_dir: Path, version: int) -> Path:
    return run_dir / MODELS_DIR / global_model_name(round_tag(version))


def model_pointer_path(run_dir: Path, version: int) -> Path:
    """The pointer beside a published model (node_payload/common/model_pointer.py)."""
    return run_dir / MODELS_DIR / global_pointer_name(round_tag(version))


def global_pointer_name(tag: str) -> str:
    """A published model's pointer file name from its version's tag (or a submit file's $(rtag))."""
    return f"global_{tag}.json"


# Where the mirrors serve a run's published models, relative to each mirror's root: the embedded
# mirrors map it onto the run's models/ folder, `[data] publish` uploads into it.
PUBLISHED_DIR = "published"


def published_model_path(run_id: str, version: int) -> str:
    """A published model's path on every mirror (a POSIX path below the mirror's root)."""
    return f"{PUBLISHED_DIR}/{run_id}/{global_model_name(round_tag(version))}"


def delta_name(tag: str) -> str:
    """The file name of the delta that makes a version's model of the one before it."""
    return f"delta_{tag}.safetensors"


def model_delta_path(run_dir: Path, version: int) -> Path:
    """The delta beside a published model (node_payload/common/model_delta.py)."""
    return run_dir / MODELS_DIR / delta_name(round_tag(version))


def published_delta_path(run_id: str, version: int) -> str:
    """A published delta's path on every mirror that holds its model."""
    return f"{PUBLISHED_DIR}/{run_id}/{delta_name(round_tag(version))}"


# The job payload; published beside the models, node jobs get only its launcher.
PAYLOAD_NAME = "dagtrain.pyz"


def published_payload_path(run_id: str) -> str:
    """The run's job payload on the mirrors that hold its models."""
    return f"{PUBLISHED_DIR}/{run_id}/{PAYLOAD_NAME}"


def server_state_path(run_dir: Path, version: int) -> Path:
    return run_dir / MODELS_DIR / f"server_{round_tag(version)}.safetensors"


def round_metrics_path(run_dir: Path, round_: int) -> Path:
    return round_dir(run_dir, round_) / "round.json"


# Asynchronous runs: lanes of jobs instead of rounds; the model file names keep round_tag for
# versions, so "global_r012" is version 12 in either mode.
ASYNC_STATE = "async/state.json"
ASYNC_LOCK = "async/lock"
ASYNC_EVENTS = "async/events.log"


def lane_tag(lane: int) -> str:
    return f"l{lane:03d}"


def job_tag(step: int) -> str:
    return f"j{step:04d}"


def lane_job_name(lane: int, step: int) -> str:
    return f"train_{lane_tag(lane)}_{job_tag(step)}"


def lane_dir(run_dir: Path, lane: int) -> Path:
    return run_dir / LANES_DIR / lane_tag(lane)


def lane_job_dir(run_dir: Path, lane: int, step: int) -> Path:
    return lane_dir(run_dir, lane) / job_tag(step)
