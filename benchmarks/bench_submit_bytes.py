"""Bytes through the submit host per synchronous round: the global model sent to every node job
by file transfer, against published once to the mirrors, side by side, without training.

Three plans of the same run (NODES node jobs of ARCH, default 100 x resnet18, on two loopback FTP
mirrors of a small procedural dataset), each a real `dagtrain plan`:

- file transfer: external mirrors and no `[data] publish`: each node job's submit file transfers
  the job payload, config.toml and the round's model;
- published to 2 mirrors, and to the first of them: the aggregation uploads the model (and its
  delta from the version before) to each publish URL (a real upload to loopback FTP servers),
  and each job's submit file transfers the payload's launcher, config.toml and the model's
  pointer; the nodes fetch the model from the mirrors (whole: a node without the version before
  in its cache) and the payload, which the planner published once, from the mirrors or their
  machine's cache.

What a round sends down is what HTCondor's own reading of the planned node.sub (through the local
runner's `load_job`) names for each node job of round 1, summed from the files' sizes; what it
sends up is NODES dense updates, one saved as a node saves it from the model's tensors. One
node's model fetch from the mirrors is real, and the mirrors' bytes are NODES times it.

Run:  python benchmarks/bench_submit_bytes.py [--nodes 100] [--arch resnet18]
"""

import argparse
import json
import os
import shutil
import tempfile
import warnings
from contextlib import ExitStack
from pathlib import Path

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler

from aggregation.publish import publish_model
from node_payload.common.model_file import load_model
from node_payload.common.run_config import RunConfig, read_run_config
from node_payload.common.run_layout import (
    CONFIG_FILE,
    DAG_FILE,
    model_path,
    model_pointer_path,
    node_name,
)
from node_payload.common.tensor_io import save_tensors, update_metadata
from node_payload.model_fetch import model_file
from node_payload.train import update_tensors
from pipeline import config as config_mod
from pipeline.dataset_prepare import prepare
from pipeline.local_runner.dag_file import parse_dag
from pipeline.local_runner.submit_description import load_job
from pipeline.mirrors import MirrorServer, serve
from pipeline.planner import make_plan, write
from pipeline.textures import generate

MB = 1e6
CONFIG = """\
[run]
name = "bytes"
nodes = {nodes}
rounds = 2
[data]
dataset = "{dataset}"
mirrors = {mirrors}
publish = {publish}
local_train = 48
local_test = 16
heldout_test = 64
[model]
arch = "{arch}"
[train]
batch_size = 16
"""


def _writable(root: Path) -> MirrorServer:
    """An anonymous FTP server writing into a mirror's root: where its models are published."""
    authorizer = DummyAuthorizer()
    with warnings.catch_warnings():  # anonymous writes: on loopback, for this benchmark only
        warnings.simplefilter("ignore", RuntimeWarning)
        authorizer.add_anonymous(str(root), perm="elradfmw")
    return MirrorServer(type("Publish", (FTPHandler,), {"authorizer": authorizer}))


def _plan(base: Path, name: str, text: str) -> Path:
    path = base / f"{name}.toml"
    path.write_text(text)
    return write(make_plan(config_mod.load(path)), base / name)


def _round_inputs(run_dir: Path, config: RunConfig, round_: int) -> int:
    """The bytes every node job of the round gets through file transfer, from node.sub."""
    dag = parse_dag(run_dir / DAG_FILE)
    total = 0
    for n in range(config.run.nodes):
        node = dag.nodes[node_name(round_, n)]
        job = load_job(node.submit_file, node.directory, node.vars, 1)
        # Lexically, as condor_submit does: a round's job folders need not exist yet.
        paths = [os.path.normpath(job.initialdir / item) for item in job.transfer_input_files]
        total += sum(os.stat(path).st_size for path in paths)
    return total


def _update_bytes(run_dir: Path, scratch: Path) -> int:
    """A dense update's size, saved as a node job saves it (from the model's own tensors)."""
    model, _ = load_model(model_path(run_dir, 0))
    state = model.state_dict()
    update = update_tensors(state, state)
    save_tensors(scratch / "update.safetensors", update, update_metadata(1, 0, 48, 1))
    return (scratch / "update.safetensors").stat().st_size


def _round(run_dir: Path, scratch: Path) -> dict[str, float]:
    """Round 1 of a planned run: its model made (model 0's bytes, as an aggregation writes one)
    and published as the aggregation would, then what crosses the submit host and the mirrors."""
    config = read_run_config(run_dir / CONFIG_FILE)
    shutil.copyfile(model_path(run_dir, 0), model_path(run_dir, 1))
    uploaded = publish_model(run_dir, config, 1)
    down = _round_inputs(run_dir, config, 1)
    up = config.run.nodes * _update_bytes(run_dir, scratch)
    from_mirrors = 0
    if config.models_from_mirrors:
        pointer = model_pointer_path(run_dir, 1)
        mirrors, cache = list(config.data.mirrors), str(scratch / "machine-cache")
        got = model_file(pointer, config.run.run_id, mirrors, 0, cache, scratch)
        fetched = got.moved.from_mirrors
        from_mirrors = config.run.nodes * (fetched.model_in + fetched.model_delta_in)
    model = model_path(run_dir, 1).stat().st_size
    return {
        "model_MB": model / MB,
        "job_inputs_MB": down / MB,
        "model_uploads_MB": uploaded / MB,
        "updates_MB": up / MB,
        "submit_host_MB": (down + uploaded + up) / MB,
        "target_MB": (2 * model + up) / MB,
        "mirrors_model_MB": from_mirrors / MB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--arch", default="resnet18")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        base = Path(tmp)
        source = generate(base / "src", classes=4, images_per_class=4, size=128, progress=False)
        dataset = base / "dataset"
        prepare(source, dataset, tile=32, overlap=0.5, holdout=0.25, progress=False)
        roots = [shutil.copytree(dataset, base / f"mirror{i}") for i in range(2)]
        readers = [stack.enter_context(serve(root, k=1)).urls[0] for root in roots]
        writers = [_writable(root) for root in roots]
        stack.callback(lambda: [w.close() for w in writers])
        publish = [f"ftp://127.0.0.1:{w.port}" for w in writers]
        runs = {
            "file transfer": [],
            "published to 2 mirrors": publish,
            "published to 1 mirror": publish[:1],
        }
        rows = {}
        for label, urls in runs.items():
            text = CONFIG.format(
                nodes=args.nodes,
                dataset=dataset,
                mirrors=json.dumps(readers),
                publish=json.dumps(urls),
                arch=args.arch,
            )
            name = label.replace(" ", "_")
            scratch = base / f"{name}-scratch"
            scratch.mkdir()
            rows[label] = _round(_plan(base, name, text), scratch)
    columns = list(next(iter(rows.values())))
    print(f"{args.nodes} node jobs x {args.arch}, one synchronous round (MB = 10^6 bytes)")
    print("| | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for label, row in rows.items():
        print(f"| {label} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")
    reference = rows["file transfer"]["submit_host_MB"]
    for label, row in rows.items():
        ratio = row["submit_host_MB"] / row["target_MB"]
        print(
            f"{label}: submit host {row['submit_host_MB'] / reference:.3f}x file transfer's, "
            f"{ratio:.3f}x the target (2 x model + nodes x update)"
        )


if __name__ == "__main__":
    main()
