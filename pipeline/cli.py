"""The `dagtrain` command: plan, run, submit, status, rm, serve, upload, prepare, demo,
baseline, predict, evaluate, export and simulate."""

import argparse
import shlex
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from node_payload.common.errors import UserError
from pipeline.inference import EXPORT_FORMATS
from pipeline.run_summary import RunStopped

if TYPE_CHECKING:
    from pipeline.remote import SshOptions

console = Console(stderr=True)


def _plan(args: argparse.Namespace) -> int:
    from pipeline.planner import plan_from_file

    run_dir = plan_from_file(args.config, args.out, args.set)
    console.print(f"planned [bold]{run_dir}[/]; run it with: dagtrain run {run_dir}")
    console.print(f"or on a pool: cd {run_dir} && condor_submit_dag dagtrain.dag")
    if run_dir.is_relative_to("/tmp"):
        console.print(
            "[yellow]note:[/] condor_submit_dag refuses a DAG under /tmp (its node log would be "
            "there); move the run directory before submitting it to a pool"
        )
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipeline.local_run import run_local

    report = run_local(
        args.run_dir.resolve(),
        slots=args.slots,
        slow_slots=dict(args.slow_slot or []),
        force=args.force,
        serial=args.serial,
        warm=not args.cold,
        evictions=args.evict,
    )
    return 0 if report["status"] == "completed" else 1


def _simulate(args: argparse.Namespace) -> int:
    from pipeline.simulate.command import run

    run(args.config, args.set, args.pool, args.machines, args.quorum, args.seed, args.out, console)
    return 0


def _slot_and_number(text: str, separator: str, expected: str) -> tuple[int, float]:
    slot, _, number = text.partition(separator)
    try:
        return int(slot), float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}") from None


def _slow_slot(text: str) -> tuple[int, float]:
    """SLOT=FACTOR as given to `dagtrain run --slow-slot`."""
    return _slot_and_number(text, "=", "SLOT=FACTOR, e.g. 1=3 (slot 1 three times as slow)")


def _eviction(text: str) -> tuple[int, float]:
    """SLOT@SECONDS as given to `dagtrain run --evict`."""
    return _slot_and_number(
        text, "@", "SLOT@SECONDS, e.g. 1@30 (evict slot 1's job 30 s into the run)"
    )


def _ssh(args: argparse.Namespace) -> "SshOptions":
    from pipeline.remote import SshOptions, parse_target

    return SshOptions(parse_target(args.remote), args.known_hosts, args.identity)


def _check_remote_options(args: argparse.Namespace) -> None:
    if not args.remote and (args.remote_dir or args.known_hosts or args.identity):
        raise UserError("--remote-dir, --known-hosts and --identity need --remote USER@HOST")


def _submit(args: argparse.Namespace) -> int:
    _check_remote_options(args)
    run_dir = args.run_dir.resolve()
    if args.remote:
        from pipeline.remote import submit_remote
        from pipeline.run_lock import RunLock

        with RunLock(run_dir, "submit"):  # the copy must not be taken mid-run
            cluster, where = submit_remote(
                run_dir, _ssh(args), args.remote_dir, maxjobs=args.maxjobs, maxidle=args.maxidle
            )
    else:
        from pipeline.submission import submit

        cluster, where = submit(run_dir, maxjobs=args.maxjobs, maxidle=args.maxidle), run_dir
    console.print(f"submitted [bold]{where}[/] as DAGMan job {cluster}", soft_wrap=True)
    options = [
        f"{flag} {shlex.quote(str(value))}"
        for flag, value in (
            ("--remote", args.remote),
            ("--remote-dir", args.remote_dir),
            ("--known-hosts", args.known_hosts),
            ("--identity", args.identity),
        )
        if value
    ]
    watch = " ".join(["dagtrain status", shlex.quote(str(run_dir)), *options, "--watch"])
    console.print(f"watch it with: {escape(watch)}", soft_wrap=True, highlight=False)
    print(cluster)
    return 0


def _status(args: argparse.Namespace) -> int:
    from pipeline.run_status import RunStatus, show, show_json

    _check_remote_options(args)
    run_dir = args.run_dir.resolve()

    def shown(read: Callable[[], RunStatus]) -> RunStatus:
        if args.json:
            return show_json(read, watch=args.watch)
        return show(read, Console(), watch=args.watch)

    if args.remote:
        from pipeline.remote import RemoteRun

        with RemoteRun(run_dir, _ssh(args), args.remote_dir) as remote:
            status = shown(remote.status)
    else:
        from pipeline.submission import status as local_status

        status = shown(lambda: local_status(run_dir))
    return 1 if status.state == "failed" else 0


def _rm(args: argparse.Namespace) -> int:
    from pipeline.run_stop import stop_run

    console.print(escape(stop_run(args.run_dir)), highlight=False, soft_wrap=True)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pipeline.mirrors import serve_forever

    serve_forever(args.dataset_dir.resolve(), args.mirrors, args.ports)
    return 0


def _upload(args: argparse.Namespace) -> int:
    from pipeline.upload import report, upload

    results = upload(
        args.dataset_dir,
        args.urls,
        replace=args.replace,
        verify=not args.no_verify,
        known_hosts=args.known_hosts,
        identity=args.identity,
        console=console,
    )
    report(results, console)
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
        angles=args.angles,
        lossless=args.lossless,
        workers=args.workers,
    )
    positions = len(manifest) // len(manifest.angles)
    console.print(
        f"prepared {len(manifest)} fragments ({positions} positions x {len(manifest.angles)} "
        f"angles) of {len(manifest.sources)} source images in {len(manifest.classes)} classes "
        f"into {args.out_dir}"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    report = run_demo(args.out.resolve(), slots=args.slots, force=args.force)
    return 0 if report["status"] == "completed" else 1


def _baseline(args: argparse.Namespace) -> int:
    from pipeline.baseline import run_baseline, summary

    out_dir = args.out.resolve()
    result = run_baseline(args.config, out_dir, steps=args.steps)
    console.print(escape(summary(result, out_dir)), highlight=False, soft_wrap=True)
    return 0


def _report_failures(errors: list[str]) -> int:
    """One line per image that could not be classified; exit code 1 when there was one."""
    for error in errors:
        console.print("[bold red]error:[/]", escape(error), highlight=False, soft_wrap=True)
    return 1 if errors else 0


def _predict(args: argparse.Namespace) -> int:
    from pipeline.inference.predict import (
        as_csv,
        check_output_suffix,
        predict,
        write_predictions,
    )
    from pipeline.inference.run_model import check_output, load_model

    run = load_model(args.run_dir, args.round)
    out = args.out and check_output(run.run_dir, args.out)
    if out:
        check_output_suffix(out)
    result = predict(
        run, args.inputs, batch=args.batch, workers=args.workers, tta=args.tta, progress=True
    )
    if out:
        write_predictions(result, out)
        console.print(f"{len(result.images)} images classified by {run.path.name}: {out}")
    else:
        print(as_csv(result), end="")
    return _report_failures([failure.error for failure in result.failures])


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.inference.evaluate import CONFUSION_FILE, EVALUATION_FILE, evaluate, summary

    result = evaluate(
        args.run_dir,
        args.labelled_dir,
        args.round,
        out_dir=args.out,
        batch=args.batch,
        workers=args.workers,
        tta=args.tta,
        progress=True,
    )
    print(summary(result))
    out = args.out.resolve()
    console.print(f"wrote {out / EVALUATION_FILE} and {out / CONFUSION_FILE}")
    return _report_failures([failure["error"] for failure in result["failures"]])


def _export(args: argparse.Namespace) -> int:
    from pipeline.inference.export import export

    path = export(args.run_dir, args.format, args.out, args.round)
    console.print(f"exported {args.run_dir} ({args.format}) to {path}")
    return 0


def _inference_options(command: argparse.ArgumentParser) -> None:
    """--round, --batch, --workers and --tta, for predict and evaluate."""
    _round_option(command)
    command.add_argument(
        "--batch",
        type=int,
        default=0,
        help="fragments classified at once (default 0: as many as keep the network's largest "
        "activation within 16 MiB, at most 64)",
    )
    command.add_argument(
        "--workers", type=int, default=0, help="threads for the model (default 0: every core)"
    )
    command.add_argument(
        "--tta",
        metavar="START:STOP:STEP",
        help="test-time rotations in degrees (stop excluded), e.g. 0:360:90; each position is "
        "classified at each angle (default: the dataset's angle closest to 0, as the held-out "
        "images vote)",
    )


def _round_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--round",
        type=int,
        metavar="N",
        help="the global model after N rounds (asynchronous runs: version N) (default: the "
        "last one in RUN_DIR/models)",
    )


def _remote_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--remote",
        metavar="USER@HOST[:PORT]",
        help="a submit host reached over SSH (default: this machine)",
    )
    command.add_argument(
        "--remote-dir",
        help="the run's directory on the submit host (default: ~/dagtrain-runs/NAME-HASH)",
    )
    command.add_argument(
        "--known-hosts", type=Path, help="known_hosts file (default: ~/.ssh/known_hosts)"
    )
    command.add_argument(
        "--identity", type=Path, help="private key file (default: ssh-agent and ~/.ssh keys)"
    )


def _force_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--force",
        action="store_true",
        help="train again from the first round, even a run that completed (which is otherwise "
        "only reported): deletes the run's results (report, round outputs and job logs, models "
        "after the initial one, rescue DAGs, the runner's journal); the planned files and the "
        "dataset are kept",
    )


EXIT_CODES = """exit codes:
  0    done; a run completed
  1    a run failed or is incomplete (dagtrain status says why);
       predict, evaluate: an image could not be read
  2    a mistake in the command, a config or a file, named in one message
  130  stopped by Ctrl-C; 143: by SIGTERM or dagtrain rm (run again to resume)"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help, unless the help says it (an option without a value
    or whose absence means something else says what); the epilog's table kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or "") or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """The command's parsers, its subcommands' included, all show defaults in their help."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(**kwargs)


def _version() -> str:
    """The installed package's version (an editable install counts)."""
    try:
        return metadata.version("dagtrain")
    except metadata.PackageNotFoundError:
        return "(not installed: pip install -e . in the repository)"


def parser() -> argparse.ArgumentParser:
    root = _Parser(
        prog="dagtrain",
        description="Train image classifiers through HTCondor DAGMan workflows.",
        epilog=EXIT_CODES,
    )
    root.add_argument("--version", action="version", version=f"dagtrain {_version()}")
    commands = root.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="write a run directory (DAG, submit files, model)")
    plan.add_argument("config", type=Path, help="a TOML config file")
    plan.add_argument("--out", type=Path, required=True, help="the new run directory")
    plan.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="set one config key over the file's, e.g. train.lr=0.1 or server.rule=median; "
        'VALUE is TOML (0.1, true, "cosine", [1, 2]), a bare word a string; repeatable '
        "(default: the file's values)",
    )
    plan.set_defaults(func=_plan)

    run = commands.add_parser("run", help="run a planned DAG on this machine (local runner)")
    run.add_argument("run_dir", type=Path, help="a planned run directory (dagtrain plan)")
    run.add_argument("--slots", type=int, default=2, help="jobs at once (default 2)")
    run.add_argument(
        "--slow-slot",
        type=_slow_slot,
        action="append",
        metavar="SLOT=FACTOR",
        help="node jobs in slot SLOT (0..SLOTS-1) work FACTOR times as long: a local stand-in "
        "for slower machines (on a pool: [faults] slow); repeatable (default: none)",
    )
    run.add_argument(
        "--evict",
        type=_eviction,
        action="append",
        default=[],
        metavar="SLOT@SECONDS",
        help="evict the job running on slot SLOT SECONDS into the run, as a desktop's owner "
        "coming back: it goes back to the queue and resumes from its last checkpoint "
        "([train] checkpoint_s), or starts again; repeatable (default: none)",
    )
    run.add_argument(
        "--serial",
        action="store_true",
        help="one node at a time (PRE script, job, POST script) in a fixed order: the models "
        "never depend on timing, an asynchronous run's included, however the run is stopped, "
        "resumed or its jobs killed",
    )
    run.add_argument(
        "--cold",
        action="store_true",
        help="start every job as a fresh process, importing torch itself, as on a pool; by "
        "default the jobs that run the payload fork from a warm interpreter with torch imported",
    )
    _force_option(run)
    run.set_defaults(func=_run)

    submit = commands.add_parser("submit", help="submit a planned run to HTCondor (DAGMan)")
    submit.add_argument("run_dir", type=Path, help="a planned run directory (dagtrain plan)")
    submit.add_argument(
        "--maxjobs", type=int, help="DAGMan throttle: node jobs queued at once (default: no limit)"
    )
    submit.add_argument(
        "--maxidle", type=int, help="DAGMan throttle: node jobs idle at once (default: no limit)"
    )
    _remote_options(submit)
    submit.set_defaults(func=_submit)

    status = commands.add_parser("status", help="show a run's rounds, nodes and accuracy")
    status.add_argument("run_dir", type=Path, help="a run directory, local or submitted")
    status.add_argument("--watch", action="store_true", help="refresh until the DAG ends")
    status.add_argument(
        "--json",
        action="store_true",
        help="the same facts as one line of JSON (with --watch: a line per change)",
    )
    _remote_options(status)
    status.set_defaults(func=_status)

    rm = commands.add_parser(
        "rm",
        aliases=["stop"],
        help="stop a run, resumably (local or submitted here)",
        description="Stop a run, keeping what it finished. A `dagtrain run` of it on this\n"
        "machine stops as on Ctrl-C (resume: dagtrain run RUN_DIR); its DAGMan job on\n"
        "this machine's schedd is removed as condor_rm would, with its node jobs\n"
        "(resume: dagtrain submit RUN_DIR).",
    )
    rm.add_argument("run_dir", type=Path, help="a running or submitted run directory")
    rm.set_defaults(func=_rm)

    serve = commands.add_parser(
        "serve",
        help="serve a prepared dataset from FTP mirrors on this machine only (loopback)",
        description="Serve a prepared dataset from embedded FTP mirrors on 127.0.0.1:\n"
        "loopback-only, anonymous and read-only. For runs and tests on this machine,\n"
        "not for a real pool, whose nodes cannot reach it: copy the dataset to real\n"
        "mirrors with `dagtrain upload`.",
    )
    serve.add_argument("dataset_dir", type=Path, help="a prepared dataset (with manifest.json)")
    serve.add_argument("--mirrors", type=int, default=2, help="mirrors on free ports")
    serve.add_argument("--ports", type=int, nargs="*", help="fixed ports (default: free ones)")
    serve.set_defaults(func=_serve)

    up = commands.add_parser(
        "upload", help="copy a prepared dataset to FTP/SFTP mirrors (resumable, verified)"
    )
    up.add_argument("dataset_dir", type=Path, help="a prepared dataset (with manifest.json)")
    up.add_argument(
        "urls",
        nargs="+",
        metavar="URL",
        help="ftp://user:password@host[:port]/path or sftp://user@host[:port]/path",
    )
    up.add_argument(
        "--replace",
        action="store_true",
        help="a mirror holding another dataset: remove its manifest first, then upload",
    )
    up.add_argument(
        "--no-verify",
        action="store_true",
        help="check sizes only, not sha256 read back from the mirror (cheaper, weaker)",
    )
    up.add_argument(
        "--known-hosts", type=Path, help="for sftp: known_hosts file (default: ~/.ssh/known_hosts)"
    )
    up.add_argument(
        "--identity", type=Path, help="for sftp: private key (default: ssh-agent and ~/.ssh keys)"
    )
    up.set_defaults(func=_upload)

    prep = commands.add_parser("prepare", help="cut source images into a fragment dataset")
    prep.add_argument(
        "src_dir", type=Path, help="one sub-folder of images per class (PNG, JPEG, TIFF)"
    )
    prep.add_argument("out_dir", type=Path, help="the dataset to write (a killed run resumes)")
    prep.add_argument("--tile", type=int, default=64, help="fragment side in pixels")
    prep.add_argument(
        "--overlap", type=float, default=0.5, help="share of a tile that neighbours overlap"
    )
    prep.add_argument(
        "--holdout", type=float, default=0.25, help="share of each class's images held out"
    )
    prep.add_argument("--seed", type=int, default=0, help="seed of the held-out draw")
    prep.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images")
    prep.add_argument(
        "--angles", default="0:360:90", help="rotations start:stop:step in degrees (stop excluded)"
    )
    prep.add_argument("--lossless", action="store_true", help="PNG blocks instead of JPEG q90")
    prep.add_argument("--workers", type=int, default=0, help="encoding processes (0: one per CPU)")
    prep.set_defaults(func=_prepare)

    demo = commands.add_parser("demo", help="generate data, plan and run a demo on this machine")
    demo.add_argument(
        "--out", type=Path, default=Path("demo-run"), help="folder for its images, data and run"
    )
    demo.add_argument("--slots", type=int, default=2, help="jobs at once")
    _force_option(demo)
    demo.set_defaults(func=_demo)

    baseline = commands.add_parser(
        "baseline",
        help="train the config's model centrally on this machine, on the same data, to compare",
    )
    baseline.add_argument("config", type=Path, help="a TOML config file")
    baseline.add_argument(
        "--steps",
        type=int,
        help="SGD steps (default: the run's total, nodes x rounds x each node job's steps)",
    )
    baseline.add_argument(
        "--out",
        type=Path,
        default=Path("baseline"),
        help="folder for baseline.json and baseline.png (default: ./baseline)",
    )
    baseline.set_defaults(func=_baseline)

    pred = commands.add_parser(
        "predict", help="classify images with a run's model (the mean softmax of their tiles)"
    )
    pred.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a trained run directory")
    pred.add_argument(
        "inputs",
        type=Path,
        nargs="+",
        metavar="INPUT",
        help="image files (PNG, JPEG, TIFF) or folders of them (searched recursively)",
    )
    pred.add_argument(
        "--out",
        type=Path,
        help="write FILE.csv or FILE.json, outside RUN_DIR (default: CSV on standard output)",
    )
    _inference_options(pred)
    pred.set_defaults(func=_predict)

    ev = commands.add_parser(
        "evaluate", help="score a run's model on labelled images (one folder per class)"
    )
    ev.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a trained run directory")
    ev.add_argument(
        "labelled_dir",
        type=Path,
        metavar="LABELLED_DIR",
        help="one sub-folder of images per class, named as the run's classes",
    )
    ev.add_argument(
        "--out",
        type=Path,
        default=Path("evaluation"),
        help="folder for evaluation.json and confusion.png, outside RUN_DIR (default: "
        "./evaluation)",
    )
    _inference_options(ev)
    ev.set_defaults(func=_evaluate)

    exp = commands.add_parser(
        "export", help="write a run's model for use without dagtrain (PyTorch, ONNX)"
    )
    exp.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a trained run directory")
    exp.add_argument(
        "--format",
        required=True,
        choices=EXPORT_FORMATS,
        help="state_dict: safetensors weights; torchscript: torch.jit.load; onnx: needs "
        "pip install 'dagtrain[onnx]' (required)",
    )
    exp.add_argument(
        "--out", type=Path, required=True, help="the file to write, outside RUN_DIR (required)"
    )
    _round_option(exp)
    exp.set_defaults(func=_export)

    sim = commands.add_parser(
        "simulate",
        help="simulate the planned DAG on a model of a pool: sync, sync with a quorum, async",
    )
    sim.add_argument("config", type=Path, help="a TOML config file")
    sim.add_argument("--pool", type=Path, help="a pool model (default: the one dagtrain ships)")
    sim.add_argument("--machines", type=int, help="machines in the pool (default: the model's)")
    sim.add_argument(
        "--quorum",
        type=float,
        help="the quorum to compare (default: the config's if below 1, else 0.8)",
    )
    sim.add_argument("--seed", type=int, default=0, help="the pool's random seed (default: 0)")
    sim.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="set one config key over the file's, as for plan; repeatable (default: none)",
    )
    sim.add_argument(
        "--out",
        type=Path,
        default=Path("simulate"),
        help="folder for simulate.json and simulate.png (default: ./simulate)",
    )
    sim.set_defaults(func=_simulate)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        console.print("[bold red]error:[/]", escape(str(exc)), highlight=False, soft_wrap=True)
        return 2
    except RunStopped as exc:
        console.print(f"[yellow]{escape(str(exc))}[/]", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished rounds and models are kept")
        return 130


if __name__ == "__main__":
    sys.exit(main())
