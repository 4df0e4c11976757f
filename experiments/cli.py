"""The `optiscope` command."""

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import textwrap
import urllib.parse

from optiscope.experiments import NAMES, load

WIDTH = 100


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="optiscope", description="See inside Keras optimizers while model.fit runs."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="train a small model with three instrumented optimizers, print statistics"
    )
    demo.add_argument("--epochs", type=_positive_int, default=3, help="epochs (default 3)")

    listing = commands.add_parser("list", help="list the experiments")
    listing.add_argument("--names", action="store_true", help="names only, one a line")
    run = commands.add_parser(
        "run",
        help="run an experiment: results (JSON, CSV, Markdown, PNG), TensorBoard and MLflow runs",
    )
    run.add_argument("experiment", choices=NAMES, help="which experiment")
    run.add_argument("--out", default="results", help="results directory (default results)")
    run.add_argument("--logdir", default="runs", help="TensorBoard log directory (default runs)")
    run.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's local store)",
    )
    run.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    run.add_argument("--quick", action="store_true", help="a reduced run, for smoke tests")
    run.add_argument(
        "--data",
        default=None,
        help="a local copy of the data set (housing: california_housing.csv[.gz]; "
        "boston: boston_housing.csv[.gz] or .npz)",
    )
    run.add_argument("--no-track", action="store_true", help="write result files only")
    run.add_argument(
        "--fit-progress",
        action="store_true",
        help="also show the epochs of each model.fit (housing, boston: long fits)",
    )

    ui = commands.add_parser(
        "ui", help="start TensorBoard and the MLflow UI on 127.0.0.1; Ctrl-C stops both"
    )
    ui.add_argument("--logdir", default="runs", help="TensorBoard log directory (default runs)")
    ui.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow backend store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    ui.add_argument("--tensorboard-port", type=_port, default=6006, help="(default 6006)")
    ui.add_argument("--mlflow-port", type=_port, default=5000, help="(default 5000)")

    server = commands.add_parser(
        "server",
        help="a team's MLflow tracking server on 127.0.0.1: PostgreSQL store, served artifacts",
    )
    server.add_argument(
        "--dir", default="optiscope-server", help="database, artifacts, logs (default %(default)s)"
    )
    server.add_argument("--port", type=_port, default=None, help="MLflow's port (default: free)")
    server.add_argument("--db-port", type=_port, default=None, help="PostgreSQL's (default: free)")
    server.add_argument("--workers", type=_positive_int, default=2, help="MLflow's (default 2)")

    replay = commands.add_parser(
        "replay", help="deliver a journal of undelivered MLflow records (complete its run)"
    )
    replay.add_argument("spool", nargs="?", help="the .jsonl journal named in the warning")
    replay.add_argument(
        "--pending",
        action="store_true",
        help="every journal in --spool-dir whose process died before delivering it",
    )
    replay.add_argument(
        "--spool-dir", default="optiscope-spool", help="for --pending (default optiscope-spool)"
    )
    replay.add_argument(
        "--tracking-uri", default=None, help="target (default: the server the run was logged to)"
    )
    replay.add_argument("--experiment", default=None, help="experiment name (default: as logged)")

    args = parser.parse_args(argv)
    if args.command == "list":
        for name in NAMES:
            print(name if args.names else f"{name:<12} {load(name).DESCRIPTION}")
        return 0
    if args.command in ("run", "demo"):
        quiet_start_up()
    if args.command == "run":
        return _run(args)
    if args.command == "demo":
        from optiscope.experiments import demo as job

        job.main(epochs=args.epochs)
    elif args.command == "ui":
        from optiscope.experiments.ui import serve

        return serve(args.logdir, args.tracking_uri, args.tensorboard_port, args.mlflow_port)
    elif args.command == "replay":
        return _replay(args)
    elif args.command == "server":
        from optiscope.experiments.server import serve

        return serve(args.dir, args.port, args.db_port, args.workers)
    return 0


def quiet_start_up():
    """Imports TensorFlow without its start-up lines on a machine without a GPU (the CUDA
    and oneDNN notices go to file descriptor 2, below Python); quiets MLflow's database
    set-up messages and TensorFlow's retracing warnings (experiments build many models)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    if _has_gpu():
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            with contextlib.suppress(ImportError):
                import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _has_gpu():
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def _tuned_runs_url(run_dir, logdir, dashboard):
    """A TensorBoard dashboard with this run's tuned settings selected (TensorBoard selects
    the runs its run filter matches, when at most 40 do)."""
    from optiscope.experiments import harness

    runs = os.path.relpath(run_dir, logdir).replace(os.sep, "/") + "/best/"
    return f"{harness.UI_TENSORBOARD}/#{dashboard}&regexInput={urllib.parse.quote(runs)}"


def _command(name):
    """How to type the console script `name` installed beside this one, from here."""
    path = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), name)
    if not os.path.exists(path):
        return name
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else path


def _run(args):
    from optiscope.experiments import harness
    from optiscope.experiments.data import DataUnavailable

    module = load(args.experiment)
    config = module.Config.quick(seed=args.seed) if args.quick else module.Config(seed=args.seed)
    if args.data is not None:
        if not hasattr(config, "data"):
            print(f"optiscope run: {args.experiment} takes no --data", file=sys.stderr)
            return 2
        config = dataclasses.replace(config, data=args.data)
    options = harness.Options(
        out=args.out,
        logdir=args.logdir,
        tracking_uri=args.tracking_uri,
        track=not args.no_track,
        progress=True,
        fit_progress=args.fit_progress,
    )
    try:
        result = harness.run_tracked(module, config, options)
    except DataUnavailable as err:
        print(f"optiscope run {args.experiment}: {err}", file=sys.stderr)
        return 2
    from optiscope.experiments.harness import text_table

    table, left_out = text_table(result.records, result.columns, width=WIDTH)
    print(f"\n{args.experiment}\n\n{table}\n")
    for note in result.notes:
        print(textwrap.fill(note, WIDTH, initial_indent="- ", subsequent_indent="  "))
    results = os.path.join(os.path.dirname(result.files["json"]), "results.md")
    more = f" (with the columns {', '.join(left_out)})" if left_out else ""
    print(
        "\n" + textwrap.fill(f"Results in {results}{more}; JSON, CSV and plots beside it.", WIDTH)
    )
    if options.track:
        tracker = result.tracker
        groups = sorted(os.listdir(tracker.tensorboard_dir))
        ui = _command("optiscope") + " ui"
        if args.logdir != "runs":
            ui += f" --logdir {args.logdir}"
        if args.tracking_uri:
            ui += f" --tracking-uri {args.tracking_uri}"
        elif args.logdir == "runs" and os.path.exists("Makefile"):
            ui += "   (or: make ui)"
        print(
            f"TensorBoard runs: {tracker.tensorboard_dir}/ ({', '.join(groups)})\n"
            f"MLflow runs: experiment {tracker.mlflow.experiment_name!r}\n"
            f"Look at them with:  {ui}\n"
            f"  TensorBoard: {_tuned_runs_url(tracker.tensorboard_dir, args.logdir, 'scalars')}\n"
            f"  (custom scalars: "
            f"{_tuned_runs_url(tracker.tensorboard_dir, args.logdir, 'custom_scalars')})\n"
            f"  MLflow:      {tracker.urls.get('MLflow') or harness.UI_MLFLOW}"
        )
    return 0


def _replay(args):
    from optiscope.tracking import pending, replay

    if (args.spool is None) == (not args.pending):
        print("optiscope replay: give a journal file or --pending (not both)", file=sys.stderr)
        return 2
    paths = pending(args.spool_dir) if args.pending else [args.spool]
    if args.pending and not paths:
        print(f"nothing to replay in {args.spool_dir}")
    for path in paths:
        if not os.path.isfile(path):
            print(f"optiscope replay: no such spool file: {path}", file=sys.stderr)
            return 2
        try:
            run_id = replay(path, tracking_uri=args.tracking_uri, experiment_name=args.experiment)
        except ValueError as err:
            print(f"optiscope replay: {err}", file=sys.stderr)
            return 2
        print(f"replayed {path} into run {run_id}")
    return 0


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _port(text):
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (1-65535), got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
