"""The planner: a validated config becomes a Plan, and a Plan becomes a run directory.

`make_plan` resolves everything that must be decided once (dataset, mirrors, seeds, held-out
set, interpreter); the plan's DAG is data (pipeline.dag). `write` writes the DAG, the submit files
and scripts rendered from dagman_templates/, the config and the initial model into a new run
directory, atomically: a failed write leaves nothing behind and never touches an existing run.
"""

import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from aggregation.async_state import Ledger, write_ledger
from aggregation.publish import publish_model
from aggregation.server_optimizer import ServerOptimizer
from node_payload.common.errors import UserError
from node_payload.common.manifest import Manifest
from node_payload.common.mirror_url import Mirror
from node_payload.common.model_file import save_model
from node_payload.common.models import build_model
from node_payload.common.run_config import (
    DataTable,
    ExecutionTable,
    ModelTable,
    RunConfig,
    TrainTable,
    to_toml,
)
from node_payload.common.run_layout import (
    ASYNC_STATE,
    CONFIG_FILE,
    DAG_FILE,
    HELDOUT_FILE,
    MODELS_DIR,
    PAYLOAD_DIR,
    SCRIPTS_DIR,
    make_node_dirs,
    model_path,
    server_state_path,
)
from node_payload.common.tensor_io import model_metadata, save_tensors
from node_payload.sampling import (
    TARGET_SOURCES,
    check_capacity,
    heldout_set,
    node_seed,
    source_shortfall,
)
from pipeline.config import ConfigFile, load
from pipeline.dag.model import Dag
from pipeline.dag.run_dag import run_dag
from pipeline.dag.writer import write_dag
from pipeline.dataset_prepare import prepare
from pipeline.mirror_check import check_mirrors
from pipeline.mirrors import free_ports
from pipeline.payload_zip import write_launcher, write_payload
from pipeline.submit_files import submit_files


@dataclass(frozen=True)
class Plan:
    """Everything a run needs, decided once; `write` turns it into files."""

    config: RunConfig
    manifest: Manifest
    dataset_dir: Path
    heldout: list[int]

    @property
    def nodes(self) -> int:
        return self.config.run.nodes

    @property
    def rounds(self) -> int:
        return self.config.run.rounds

    def seed(self, round_: int, node: int) -> int:
        return node_seed(self.config.run.seed, round_, node)

    @property
    def dag(self) -> Dag:
        """The run's DAG node by node: reading the file `write` writes gives it again."""
        return run_dag(self.config).expand()


def _warn(message: str, label: str = "[yellow]warning:[/]") -> None:
    Console(stderr=True).print(f"{label} {escape(message)}", soft_wrap=True)


def _check_batches(data: DataTable, train: TrainTable, origin: str) -> None:
    """A node trains on whole batches of its local set (node_payload.train drops an epoch's
    last partial batch), so the set must hold one batch, and ideally a whole number of them."""
    local, batch = data.local_train, train.batch_size
    if local < batch:
        raise UserError(
            f"{origin}: [data] local_train = {local} is smaller than [train] batch_size = "
            f"{batch}, so every step would train on the same {local} fragments; raise "
            f"local_train to at least {batch} or lower batch_size"
        )
    if local % batch:
        lower, upper = local - local % batch, local - local % batch + batch
        _warn(
            f"{origin}: [data] local_train = {local} is not a multiple of [train] batch_size = "
            f"{batch}: each pass over a node's local set leaves its last {local % batch} "
            f"fragments untrained; set local_train to {lower} or {upper}"
        )


def _check_diversity(manifest: Manifest) -> None:
    """Say how far short of TARGET_SOURCES images per class the local train sets fall."""
    short = source_shortfall(manifest)
    if not short:
        return
    by_count: dict[int, list[str]] = {}
    for name, n in short.items():
        by_count.setdefault(n, []).append(repr(name))
    counts = "; ".join(
        f"{n} in {', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}"
        for n, names in sorted(by_count.items())
    )
    _warn(
        f"{manifest.origin}: a node's local train set spans up to {TARGET_SOURCES} source images "
        f"per class, but {len(short)} of {len(manifest.classes)} classes have fewer to give "
        f"(non-holdout images less one for the local test): {counts}; local sets use what there "
        f"is. Add images, or prepare the dataset with a lower holdout (now {manifest.holdout})",
        label="note:",  # the plan is sound: its local sets are as varied as the data allows
    )


def _dataset(source: ConfigFile) -> tuple[DataTable, Manifest]:
    """Prepare the images, unless a prepared dataset is named; paths become absolute."""
    data = source.config.data
    if data.dataset:
        dataset_dir = source.path(data.dataset)
    else:
        images = source.path(data.source)
        dataset_dir = images.with_name(images.name + ".prepared")
    if data.source:
        data = replace(data, source=str(source.path(data.source)))
        manifest = prepare(
            Path(data.source),
            dataset_dir,
            tile=data.tile,
            overlap=data.overlap,
            holdout=data.holdout,
            seed=source.config.run.seed,
            angles=data.angles,
            lossless=data.lossless,
            on_bad_image="skip" if data.skip_bad_images else "fail",
        )
    else:
        manifest = Manifest.load(dataset_dir / "manifest.json")
    return replace(data, dataset=str(dataset_dir), manifest_sha256=manifest.digest()), manifest


def _mirrors(data: DataTable, manifest: Manifest) -> DataTable:
    """Check the user's mirrors serve this dataset, or pick ports for embedded ones."""
    if data.mirrors:
        check_mirrors(list(data.mirrors), manifest.digest())
        if not data.publish:
            _warn(
                "[data] publish is empty: each node job gets the global model from the submit "
                "host by HTCondor file transfer (nodes x model size per round); list upload "
                "URLs of the mirrors in [data] publish to send each model once, to the mirrors",
                label="note:",
            )
        return data
    ports = free_ports(data.embedded_mirrors)
    return replace(data, mirrors=tuple(f"ftp://127.0.0.1:{p}" for p in ports), embedded=True)


def _model(source: ConfigFile, manifest: Manifest) -> ModelTable:
    model = source.config.model
    channels = 1 if manifest.mode == "L" else 3
    if model.in_channels and model.in_channels != channels:
        raise UserError(
            f"{source.origin}: [model] in_channels = {model.in_channels} but the dataset's "
            f"images are {manifest.mode} ({channels} channel(s)); set in_channels = {channels}"
        )
    return replace(model, in_channels=channels, image_size=model.image_size or manifest.tile)


def _execution(source: ConfigFile) -> ExecutionTable:
    """Decide how node jobs find Python, and which Python runs the submit-host jobs."""
    execution = source.config.execution
    execution = replace(execution, submit_python=execution.submit_python or sys.executable)
    if execution.env_tarball:
        tarball = source.path(execution.env_tarball)
        if not tarball.is_file():
            raise UserError(
                f"{source.origin}: [execution] env_tarball = {execution.env_tarball!r}: "
                f"no such file ({tarball})"
            )
        return replace(execution, env_tarball=str(tarball))
    default = "/usr/bin/python3" if execution.container_image else sys.executable
    return replace(execution, python=execution.python or default)


def make_plan(source: ConfigFile) -> Plan:
    """Resolve a validated config into a plan; prepares the dataset when it is not yet prepared.

    The plan holds a new, resolved config: the user's is never changed.
    """
    _check_batches(source.config.data, source.config.train, source.origin)
    data, manifest = _dataset(source)
    check_capacity(manifest, data.local_train, data.local_test)
    _check_diversity(manifest)
    config = replace(
        source.config,
        data=_mirrors(data, manifest),
        model=_model(source, manifest),
        execution=_execution(source),
        run=replace(source.config.run, run_id=source.config.run.run_id or secrets.token_hex(8)),
    )
    heldout = heldout_set(manifest, data.heldout_test, config.run.seed)
    return Plan(config, manifest, Path(data.dataset), heldout)


def _text_files(plan: Plan) -> dict[str, str]:
    """Every text file of the run directory by its path in it."""
    heldout = {"manifest_sha256": plan.manifest.digest(), "fragments": plan.heldout}
    return {
        CONFIG_FILE: to_toml(plan.config),
        HELDOUT_FILE: json.dumps(heldout) + "\n",
        **submit_files(plan.config),
    }


def _initial_model(plan: Plan, run_dir: Path) -> None:
    model_cfg = plan.config.model
    classes = len(plan.manifest.classes)
    model = build_model(model_cfg.arch, classes, model_cfg.in_channels, seed=plan.config.run.seed)
    metadata = model_metadata(
        0, model_cfg.arch, classes, model_cfg.in_channels, model_cfg.image_size
    )
    save_model(model_path(run_dir, 0), model, metadata)
    optimizer = ServerOptimizer.from_config(plan.config.server)
    save_tensors(server_state_path(run_dir, 0), *optimizer.state_dict())
    publish_model(run_dir, plan.config, 0)


def _job_dirs(plan: Plan, run_dir: Path) -> None:
    """Round 0's node-job folders (each aggregation makes the next round's, and an asynchronous
    job's PRE script its own), and for an asynchronous run its ledger at version 0."""
    if plan.config.is_async:
        (run_dir / ASYNC_STATE).parent.mkdir()
        write_ledger(run_dir, Ledger(run_id=plan.config.run.run_id))
        return
    make_node_dirs(run_dir, 0, plan.nodes)


def _check_target(run_dir: Path) -> None:
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UserError(
            f"{run_dir}: already exists and is not empty; a run directory is never overwritten. "
            "Choose another --out, or delete it if you no longer need that run"
        )


def _holds_credentials(config: RunConfig) -> bool:
    """Mirror passwords are in config.toml: its mode is then 0600, as for ~/.netrc."""
    return any(Mirror.parse(url).password for url in config.data.mirrors)


def _staging_dir(run_dir: Path) -> Path:
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", dir=run_dir.parent))
    except OSError as exc:
        raise UserError(
            f"{run_dir}: cannot create the run directory there ({exc.strerror}); choose an --out "
            "in a folder you can write to"
        ) from None


def write(plan: Plan, run_dir: Path) -> Path:
    """Write the run directory atomically: everything appears at once, or nothing does."""
    run_dir = run_dir.resolve()
    _check_target(run_dir)
    staging = _staging_dir(run_dir)
    try:
        write_dag(run_dag(plan.config), staging / DAG_FILE)
        for relative, text in _text_files(plan).items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        for script in (staging / SCRIPTS_DIR).iterdir():
            script.chmod(0o755)
        if _holds_credentials(plan.config):
            (staging / "config.toml").chmod(0o600)
        (staging / PAYLOAD_DIR).mkdir()
        write_payload(staging / PAYLOAD_DIR)
        write_launcher(staging / PAYLOAD_DIR, plan.config)
        (staging / MODELS_DIR).mkdir()
        _initial_model(plan, staging)
        _job_dirs(plan, staging)
        if run_dir.exists():
            run_dir.rmdir()
        os.rename(staging, run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return run_dir


def plan_from_file(config_path: Path, run_dir: Path, overrides: Sequence[str] = ()) -> Path:
    """`dagtrain plan CONFIG --out RUN_DIR [--set TABLE.KEY=VALUE ...]`."""
    return write(make_plan(load(config_path, overrides)), run_dir)
