"""What every experiment shares: options, results written as data first (JSON, CSV, Markdown)
and plots second, tracking as an MLflow parent run with one child per optimizer setting plus
a TensorBoard run per setting, and progress bars."""

import contextlib
import csv
import dataclasses
import json
import math
import os

from optiscope.tracking import MlflowSink, NullSink, SinkList, TensorBoardSink, naming


@dataclasses.dataclass(frozen=True)
class Options:
    """Where an experiment writes. `track=False` writes result files only."""

    out: str = "results"
    logdir: str = "runs"
    tracking_uri: str | None = None
    track: bool = True
    progress: bool = True


@dataclasses.dataclass
class Result:
    """An experiment's outcome: one record per optimizer setting (its hyperparameters and
    outcome figures), the table's columns, notes (claims checked, explanations), the source's
    reference numbers, and figures (name -> matplotlib figure)."""

    experiment: str
    records: list
    columns: list
    notes: list = dataclasses.field(default_factory=list)
    reference: list = dataclasses.field(default_factory=list)
    reference_columns: list = dataclasses.field(default_factory=list)
    figures: dict = dataclasses.field(default_factory=dict)
    files: dict = dataclasses.field(default_factory=dict)

    def table(self):
        return markdown_table(self.records, self.columns)


def _cell(value):
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_cell(v) for v in value) + ")"
    return str(value)


def markdown_table(records, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for record in records:
        lines.append("| " + " | ".join(_cell(record.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


def write(result, out):
    """Writes results.json, results.csv, results.md and one PNG per figure under
    `out/<experiment>/`; returns {name: path}."""
    directory = os.path.join(out, result.experiment)
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, f"results.{name}") for name in ("json", "csv", "md")}
    with open(paths["json"], "w") as file:
        json.dump(
            {
                "experiment": result.experiment,
                "records": _jsonable(result.records),
                "notes": result.notes,
                "reference": _jsonable(result.reference),
            },
            file,
            indent=2,
        )
    with open(paths["csv"], "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=result.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([{c: _cell(r.get(c, "")) for c in result.columns} for r in result.records])
    with open(paths["md"], "w") as file:
        file.write(f"# {result.experiment}\n\n{result.table()}\n")
        if result.reference:
            source = markdown_table(result.reference, result.reference_columns)
            file.write(f"\nSource's numbers:\n\n{source}\n")
        if result.notes:
            file.write("\n" + "\n".join(f"- {note}" for note in result.notes) + "\n")
    for name, figure in result.figures.items():
        paths[name] = os.path.join(directory, f"{name}.png")
        figure.savefig(paths[name], dpi=100, bbox_inches="tight")
    result.files = paths
    return paths


class Tracker:
    """An MLflow parent run for the experiment, one child run and one TensorBoard run per
    optimizer setting."""

    def __init__(self, experiment, options):
        self.experiment = experiment
        self.options = options
        self.name = naming.run_name(experiment)
        if options.track:
            self.parent = MlflowSink(
                tracking_uri=options.tracking_uri, experiment_name="optiscope", run_name=self.name
            )
            self.parent.set_tags({"optiscope.experiment": experiment})
        else:
            self.parent = None

    def setting(self, name, params, tags=None):
        """Sinks for one optimizer setting; `params` (and `tags`) go to its child run."""
        if self.parent is None:
            return NullSink()
        child = self.parent.child(name)
        if tags:
            child.set_tags(tags)
        sinks = SinkList(
            [TensorBoardSink(logdir=self.options.logdir, run_name=f"{self.name}/{name}"), child]
        )
        sinks.log_params(params)
        return sinks

    def finish(self, result, status="FINISHED"):
        if self.parent is None:
            return
        board = TensorBoardSink(logdir=self.options.logdir, run_name=f"{self.name}/summary")
        for name, figure in result.figures.items():
            board.log_figure(name, figure, step=1)
            self.parent.log_figure(name, figure, step=1)
        for path in result.files.values():
            self.parent.log_artifact(path, "results")
        board.close()
        self.parent.close(status)


def progress(total, description, enabled=True):
    """A rich progress bar (or nothing): `with progress(n, "...") as advance: advance()`."""
    if not enabled:
        return contextlib.nullcontext(lambda *_: None)
    return _RichProgress(total, description)


class _RichProgress:
    def __init__(self, total, description):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self):
        self._progress.start()
        return lambda label=None: self._progress.update(
            self._task, advance=1, **({"description": label} if label else {})
        )

    def __exit__(self, *exc):
        self._progress.stop()
        return False


def run_tracked(module, config, options):
    """Runs an experiment module with tracking, writes its files, returns the Result."""
    tracker = Tracker(module.NAME, options)
    try:
        result = module.run(config, tracker=tracker, options=options)
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        if tracker.parent is not None:
            tracker.parent.close(status)
        raise
    write(result, options.out)
    tracker.finish(result)
    return result
