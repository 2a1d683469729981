"""The `dagtrain` command: plan, run, serve, prepare and demo."""

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from node_payload.errors import UserError

console = Console(stderr=True)


def _plan(args: argparse.Namespace) -> int:
    from pipeline.planner import plan_from_file

    run_dir = plan_from_file(args.config, args.out)
    console.print(f"planned [bold]{run_dir}[/]; run it with: dagtrain run {run_dir}")
    console.print(f"or on a pool: cd {run_dir} && condor_submit_dag dagtrain.dag")
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipeline.local_run import run_local

    report = run_local(args.run_dir.resolve(), slots=args.slots)
    return 0 if report["status"] == "completed" else 1


def _serve(args: argparse.Namespace) -> int:
    from pipeline.mirrors import serve_forever

    serve_forever(args.dataset_dir.resolve(), args.mirrors, args.ports)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from pipeline.dataset_prepare import prepare

    manifest = prepare(
        args.src_dir.resolve(),
        args.out_dir.resolve(),
        tile=args.tile,
        overlap=args.overlap,
        holdout=args.holdout,
        seed=args.seed,
        on_bad_image="skip" if args.skip_bad_images else "fail",
    )
    console.print(
        f"prepared {len(manifest.fragments)} fragments of {len(manifest.sources)} source images "
        f"in {len(manifest.classes)} classes into {args.out_dir}"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    report = run_demo(args.out.resolve(), slots=args.slots)
    return 0 if report["status"] == "completed" else 1


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="dagtrain",
        description="Train image classifiers through HTCondor DAGMan workflows.",
    )
    commands = root.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="write a run directory (DAG, submit files, model)")
    plan.add_argument("config", type=Path, help="a TOML config file")
    plan.add_argument("--out", type=Path, required=True, help="the new run directory")
    plan.set_defaults(func=_plan)

    run = commands.add_parser("run", help="run a planned DAG on this machine (local runner)")
    run.add_argument("run_dir", type=Path)
    run.add_argument("--slots", type=int, default=2, help="jobs at once (default 2)")
    run.set_defaults(func=_run)

    serve = commands.add_parser("serve", help="serve a prepared dataset from embedded FTP mirrors")
    serve.add_argument("dataset_dir", type=Path)
    serve.add_argument("--mirrors", type=int, default=2)
    serve.add_argument("--ports", type=int, nargs="*", help="fixed ports (default: free ones)")
    serve.set_defaults(func=_serve)

    prep = commands.add_parser("prepare", help="cut source images into a fragment dataset")
    prep.add_argument("src_dir", type=Path)
    prep.add_argument("out_dir", type=Path)
    prep.add_argument("--tile", type=int, default=64)
    prep.add_argument("--overlap", type=float, default=0.5)
    prep.add_argument("--holdout", type=float, default=0.25)
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images")
    prep.set_defaults(func=_prepare)

    demo = commands.add_parser("demo", help="generate data, plan and run a demo on this machine")
    demo.add_argument("--out", type=Path, default=Path("demo-run"))
    demo.add_argument("--slots", type=int, default=2)
    demo.set_defaults(func=_demo)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        console.print("[bold red]error:[/]", escape(str(exc)), highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished rounds and models are kept")
        return 130


if __name__ == "__main__":
    sys.exit(main())
