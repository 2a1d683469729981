"""Training quality: the federated run against the centralized baseline on the same data.

All runs happen in one invocation, so they share the machine's load: compare the ratios, not
seconds across invocations. The runs, through the real commands:

  central      `dagtrain baseline` at S = nodes x rounds x local_steps SGD steps
  federated a  `dagtrain plan` + `dagtrain run` (local runner, embedded mirrors): equal total steps
  federated b  the same with local_steps x nodes: equal wall time on `nodes` machines
  federated c  (b)'s steps as rounds x nodes of (a)'s local steps, with lr x nodes and a 5%
               warm-up: equal wall time again, nodes averaged as often as in (a), at the lr
               the linear scaling rule gives their mean step
  parallel a   the baseline with batch and lr x nodes at S / nodes steps: `nodes` machines that
               average their gradients every step (the linear scaling rule), the best a
               synchronous data-parallel run can be expected to do at (a)'s compute
  central NxS  (--long-baseline) the baseline at nodes x S steps: what (b)'s compute buys centrally
  parallel b   (--long-baseline) parallel a at S steps: the same ceiling for (b)

Targets: (a) >= 0.95 x central; (b) and (c) >= central + 5 points of held-out accuracy.

Run:  nice -n 5 .venv/bin/python benchmarks/bench_quality.py IMAGES_OR_DATASET [--nodes 4]
          [--rounds 8] [--local-steps 8] [--set train.lr=0.1 ...] [--long-baseline]
          [--runs central federated_c ...] [--out DIR]
      nice -n 5 .venv/bin/python benchmarks/bench_quality.py --demo   (procedural demo textures)
"""

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from node_payload.common.errors import UserError
from node_payload.common.run_config import toml_value
from pipeline.config import override
from pipeline.dataset_prepare import prepare
from pipeline.demo import demo_textures

REPO = Path(__file__).resolve().parent.parent
RUNS = (
    "central",
    "parallel_a",
    "federated_a",
    "federated_b",
    "federated_c",
    "central_long",
    "parallel_b",
)
SCALED_WARMUP = 0.05  # the linear scaling rule comes with a gradual warm-up (Goyal et al.)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, nargs="?", help="ImageFolder images or a dataset")
    parser.add_argument("--demo", action="store_true", help="the demo's procedural textures")
    parser.add_argument("--out", type=Path, default=Path("bench-quality"))
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--angles", default="0:360:5")
    parser.add_argument("--holdout", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--slots", type=int, default=2, help="node jobs at once (dagtrain run)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="a config key for every run (VALUE in TOML: 0.1, true, '\"cosine\"'); repeatable",
    )
    parser.add_argument("--long-baseline", action="store_true", help="also central at N x S")
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=RUNS,
        default=None,
        help="only these runs (central is always run: the others are compared with it)",
    )
    args = parser.parse_args()
    if args.demo == (args.data is not None):
        parser.error("give an image folder or prepared dataset, or --demo, not both")
    return args


def _dataset(args: argparse.Namespace, out: Path) -> Path:
    """A prepared dataset as given, or the images prepared under out/ (reused when unchanged)."""
    if args.data is not None and (args.data / "manifest.json").is_file():
        return args.data.resolve()
    images = demo_textures(out) if args.demo else args.data.resolve()
    dataset = out / "dataset"
    prepare(images, dataset, args.tile, args.overlap, args.holdout, args.seed, angles=args.angles)
    return dataset


def _config(args: argparse.Namespace, dataset: Path) -> dict[str, dict[str, Any]]:
    """Federated run (a): each node job sees each fragment of its local set once."""
    raw: dict[str, dict[str, Any]] = {
        "run": {"name": "quality", "nodes": args.nodes, "rounds": args.rounds, "seed": args.seed},
        "data": {
            "dataset": str(dataset),
            "local_train": args.local_steps * args.batch,
            "local_test": 64,
            "heldout_test": 1000,
        },
        "model": {"arch": "smallcnn"},
        "train": {"local_steps": args.local_steps, "batch_size": args.batch, "lr": args.lr},
    }
    for setting in args.set:
        try:
            override(raw, setting)
        except UserError as exc:
            sys.exit(str(exc))
    return raw


def _parallel(raw: dict[str, dict[str, Any]], nodes: int) -> dict[str, dict[str, Any]]:
    """One machine standing for `nodes` that average gradients every step: batch and lr x nodes
    (Goyal et al.'s linear scaling rule; x4 beat x2 and x8 for 4 nodes, docs/benchmarks.md)."""
    wide = copy.deepcopy(raw)
    wide["train"]["batch_size"] = raw["train"]["batch_size"] * nodes
    wide["train"]["lr"] = raw["train"]["lr"] * nodes
    wide["data"]["local_train"] *= nodes  # at least one batch, as the plan requires
    return wide


def _scaled(raw: dict[str, dict[str, Any]], nodes: int) -> dict[str, dict[str, Any]]:
    """Federated (c): nodes x the rounds at the same local steps, lr x nodes after a warm-up."""
    scaled = copy.deepcopy(raw)
    scaled["run"]["rounds"] = raw["run"]["rounds"] * nodes
    scaled["train"]["lr"] = raw["train"]["lr"] * nodes
    scaled["train"]["warmup"] = SCALED_WARMUP
    return scaled


def _write_config(raw: dict[str, dict[str, Any]], path: Path) -> Path:
    path.write_text(
        "".join(
            f"[{table}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items())
            for table, keys in raw.items()
        )
    )
    return path


def _dagtrain(*argv: str) -> float:
    """Run one dagtrain command; its wall seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], check=True, cwd=REPO)
    return time.perf_counter() - started


def _central(config: Path, steps: int, out: Path) -> dict[str, Any]:
    seconds = _dagtrain("baseline", str(config), "--steps", str(steps), "--out", str(out))
    result = json.loads((out / "baseline.json").read_text())
    return {
        "steps": steps,
        "accuracy": result["heldout_accuracy"],
        "image_accuracy": result["heldout_image_accuracy"],
        "seconds": seconds,
    }


def _federated(config: Path, run_dir: Path, slots: int, steps: int) -> dict[str, Any]:
    _dagtrain("plan", str(config), "--out", str(run_dir))
    seconds = _dagtrain("run", str(run_dir), "--slots", str(slots))
    report = json.loads((run_dir / "report.json").read_text())
    if report["status"] != "completed":
        sys.exit(f"{run_dir}: the run ended {report['status']}; see its report.json")
    return {
        "steps": steps,
        "accuracy": report["final_accuracy"],
        "image_accuracy": report["final_image_accuracy"],
        "seconds": seconds,
    }


def _checkout() -> dict[str, Any]:
    """The commit measured, and the uncommitted changes to code the runs execute."""

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True).stdout

    changed = git("status", "--porcelain", "--", "node_payload", "aggregation", "pipeline")
    return {"commit": git("rev-parse", "HEAD").strip(), "uncommitted": changed.split("\n")[:-1]}


def _table(results: dict[str, dict[str, Any]], nodes: int) -> Table:
    central = results["central"]["accuracy"]
    table = Table(title="held-out accuracy: federated against centralized")
    for column in ("run", "steps", "accuracy", "against central", "image accuracy", "wall s"):
        table.add_column(column, justify="right" if column != "run" else "left")
    labels = {
        "central": ("central, S steps", ""),
        "federated_a": ("federated (a), equal steps", "ratio {ratio:.3f} (target >= 0.95)"),
        "federated_b": (
            f"federated (b), {nodes} x steps",
            "{points:+.1f} points (target >= +5)",
        ),
        "federated_c": (
            f"federated (c), rounds and lr x {nodes}",
            "{points:+.1f} points (target >= +5)",
        ),
        "parallel_a": (
            f"batch and lr x {nodes}, S / {nodes} steps",
            "ratio {ratio:.3f}: the ceiling for (a)",
        ),
        "central_long": (f"central, {nodes} x S steps", "{points:+.1f} points"),
        "parallel_b": (f"batch and lr x {nodes}, S steps", "{points:+.1f} points: ceiling for (b)"),
    }
    for name in RUNS:
        if name not in results:
            continue
        run = results[name]
        label, against = labels[name]
        ratio, points = run["accuracy"] / central, 100 * (run["accuracy"] - central)
        table.add_row(
            label,
            str(run["steps"]),
            f"{run['accuracy']:.3f}",
            against.format(ratio=ratio, points=points),
            f"{run['image_accuracy']:.3f}",
            f"{run['seconds']:.0f}",
        )
    return table


def main() -> None:
    args = _arguments()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in RUNS:  # this invocation's runs only: the prepared dataset is kept
        shutil.rmtree(out / name, ignore_errors=True)
    dataset = _dataset(args, out)
    raw = _config(args, dataset)
    wide = copy.deepcopy(raw)
    wide["train"]["local_steps"] *= args.nodes
    wide["data"]["local_train"] *= args.nodes
    config_a = _write_config(raw, out / "quality_a.toml")
    config_b = _write_config(wide, out / "quality_b.toml")
    config_c = _write_config(_scaled(raw, args.nodes), out / "quality_c.toml")
    config_p = _write_config(_parallel(raw, args.nodes), out / "quality_parallel.toml")
    steps = args.nodes * args.rounds * raw["train"]["local_steps"]
    runs = {
        "central": lambda: _central(config_a, steps, out / "central"),
        "parallel_a": lambda: _central(config_p, steps // args.nodes, out / "parallel_a"),
        "federated_a": lambda: _federated(config_a, out / "federated_a", args.slots, steps),
        "federated_b": lambda: _federated(
            config_b, out / "federated_b", args.slots, steps * args.nodes
        ),
        "federated_c": lambda: _federated(
            config_c, out / "federated_c", args.slots, steps * args.nodes
        ),
    }
    if args.long_baseline:
        runs["central_long"] = lambda: _central(config_a, steps * args.nodes, out / "central_long")
        runs["parallel_b"] = lambda: _central(config_p, steps, out / "parallel_b")
    if args.runs:
        runs = {name: run for name, run in runs.items() if name == "central" or name in args.runs}
    summary: dict[str, Any] = {
        **_checkout(),  # what the runs execute, taken before they start
        "dataset": str(dataset),
        "cores": os.cpu_count(),
        "slots": args.slots,
        "load_before": os.getloadavg(),
        "config": raw,
        "runs": {},
    }
    for name, run in runs.items():  # written after each run: a stopped benchmark keeps them
        summary["runs"][name] = run()
        _compare(summary)
        (out / "bench_quality.json").write_text(json.dumps(summary, indent=1) + "\n")
    Console(width=110).print(_table(summary["runs"], args.nodes))
    print(f"commit {summary['commit'][:10]}; written {out / 'bench_quality.json'}")


def _compare(summary: dict[str, Any]) -> None:
    """The figures the targets speak of, once their runs are done."""
    runs = summary["runs"]
    central = runs["central"]["accuracy"]
    if "federated_a" in runs:
        summary["ratio_a"] = runs["federated_a"]["accuracy"] / central
        summary["target_a_met"] = summary["ratio_a"] >= 0.95
    for name, key in (("federated_b", "points_b"), ("federated_c", "points_c")):
        if name in runs:
            summary[key] = 100 * (runs[name]["accuracy"] - central)
            summary[f"target_{key[-1]}_met"] = summary[key] >= 5


if __name__ == "__main__":
    main()
