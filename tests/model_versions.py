"""A planned run with a second model version published beside the first, for the tests of model
deltas and of the payload's launcher: the run's embedded mirrors, served on their planned ports
from a models/ folder the test may tamper with."""

import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from aggregation.publish import publish_model
from node_payload.common.model_file import load_model, save_model
from node_payload.common.run_config import RunConfig, read_run_config
from node_payload.common.run_layout import CONFIG_FILE, MODELS_DIR, model_path
from pipeline.local_run import mirror_ports
from pipeline.mirrors import serve
from pipeline.planner import plan_from_file


def config_of(run_dir: Path) -> RunConfig:
    return read_run_config(run_dir / CONFIG_FILE)


def publish_version_1(run_dir: Path, changed: float = 0.02) -> None:
    """Version 1: version 0 with `changed` of each parameter's values moved and BatchNorm's
    statistics updated, as a sparse round leaves it; published with its delta."""
    model, metadata = load_model(model_path(run_dir, 0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            flat = param.view(-1)
            picked = torch.randperm(len(flat), generator=gen)[: max(1, int(len(flat) * changed))]
            flat[picked] += 0.01
        for name, buffer in model.named_buffers():
            buffer += 1 if not buffer.is_floating_point() else 0.01 * ("var" in name)
    save_model(model_path(run_dir, 1), model, metadata | {"version": "1"})
    publish_model(run_dir, config_of(run_dir), 1)


def planned_with_version_1(tiny_config: Callable[..., Path], tmp_path: Path) -> Path:
    """A planned run on embedded mirrors, its machine cache in tmp_path/cache, with version 1
    published."""
    cache = f'"{tmp_path / "cache"}"'
    run_dir = plan_from_file(tiny_config(data__node_cache=cache), tmp_path / "run")
    publish_version_1(run_dir)
    return run_dir


@contextmanager
def served(run_dir: Path, models: Path | None = None) -> Iterator[list[str]]:
    """The run's planned mirrors serving its dataset and the models in `models` (default: the
    run's own), and its payload."""
    config = config_of(run_dir)
    folder = models or run_dir / MODELS_DIR
    with ExitStack() as stack:
        for port in mirror_ports(list(config.data.mirrors)):
            stack.enter_context(
                serve(Path(config.data.dataset), [port], run_models=(config.run.run_id, folder))
            )
        yield list(config.data.mirrors)


def models_copy(run_dir: Path, dest: Path) -> Path:
    """A copy of the run's models/ beside its payload folder, to tamper with."""
    shutil.copytree(run_dir / "payload", dest / "payload")
    return shutil.copytree(run_dir / MODELS_DIR, dest / MODELS_DIR)
