"""`dagtrain demo`: procedural textures -> prepared dataset -> planned DAG -> local run.

Everything lands under one folder; running the demo again resumes or reuses what is there.
"""

import json
import tomllib
from pathlib import Path
from typing import Any

from rich.console import Console

from node_payload.common.run_layout import DAG_FILE, REPORT_FILE
from pipeline import planner
from pipeline.config import from_dict
from pipeline.local_run import run_local
from pipeline.textures import generate

DEMO_CONFIG = """\
# The demo's config: edit it and run `dagtrain plan demo.toml --out run2` to try variations.
[run]
name = "demo"
nodes = 4
rounds = 6
quorum = 0.75
seed = 1

[data]
source = "data/textures"
dataset = "data/dataset"
tile = 64
overlap = 0.5
holdout = 0.25
angles = "0:360:30"    # 12 rotations per position, applied on the nodes
local_train = 480
local_test = 96
heldout_test = 600

[model]
arch = "smallcnn"

[train]
local_steps = 45
batch_size = 32
lr = 0.05
momentum = 0.9

[server]
lr = 1.0
momentum = 0.0
"""


def demo_textures(out: Path) -> Path:
    """The demo's source images, out/data/textures (the path DEMO_CONFIG names), made once."""
    source = out / "data" / "textures"
    if not source.is_dir():
        Console(stderr=True).print("generating procedural texture images ...")
        generate(source, classes=6, images_per_class=8, size=1000, seed=1)
    return source


def run_demo(out: Path, slots: int = 2, force: bool = False) -> dict[str, Any]:
    """A finished demo is reported, not rerun (`force` trains it again on the same dataset)."""
    out.mkdir(parents=True, exist_ok=True)
    demo_textures(out)
    config_path = out / "demo.toml"
    if not config_path.is_file():
        config_path.write_text(DEMO_CONFIG)
    run_dir = out / "run"
    if not (run_dir / DAG_FILE).is_file():
        planner.plan_from_file(config_path, run_dir)
    return run_local(run_dir, slots=slots, force=force)


def run_demo_variant(
    out: Path, name: str, overrides: dict[str, dict[str, Any]], slots: int
) -> dict[str, Any]:
    """The demo with some config keys changed, planned into out/name and run; a run that already
    has its report is read back. For benchmarks that compare settings on the demo task."""
    run_dir = out / name
    if not (run_dir / REPORT_FILE).is_file():
        raw = tomllib.loads(DEMO_CONFIG)
        for table, keys in overrides.items():
            raw.setdefault(table, {}).update(keys)
        raw["data"] |= {"source": str(demo_textures(out)), "dataset": str(out / "data/dataset")}
        config = from_dict(raw, f"demo variant {name}", out)
        planner.write(planner.make_plan(config), run_dir)
        run_local(run_dir, slots=slots, show_progress=False)
    return json.loads((run_dir / REPORT_FILE).read_text())
