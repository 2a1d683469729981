"""`dagtrain demo`: procedural textures -> prepared dataset -> planned DAG -> local run.

Everything lands under one folder; running the demo again resumes or reuses what is there.
"""

from pathlib import Path
from typing import Any

from rich.console import Console

from node_payload.run_layout import DAG_FILE
from pipeline.local_run import run_local
from pipeline.planner import plan_from_file
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


def run_demo(out: Path, slots: int = 2) -> dict[str, Any]:
    console = Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    source = out / "data" / "textures"
    if not source.is_dir():
        console.print("generating procedural texture images ...")
        generate(source, classes=6, images_per_class=8, size=1000, seed=1)
    config_path = out / "demo.toml"
    if not config_path.is_file():
        config_path.write_text(DEMO_CONFIG)
    run_dir = out / "run"
    if not (run_dir / DAG_FILE).is_file():
        plan_from_file(config_path, run_dir)
    return run_local(run_dir, slots=slots)
