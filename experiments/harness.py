"""What every experiment shares: the `Experiment` protocol, options, results written as data
first (JSON, CSV, Markdown) and plots second, tracking (`Tracker`: an MLflow parent run, one
run per setting in MLflow and TensorBoard, the tuned settings apart from the grid), progress
on stderr and tables that fit a terminal."""

import contextlib
import csv
import dataclasses
import json
import math
import os
import re
import sys
import time
import typing

import numpy as np

from optiscope.callbacks import publishing
from optiscope.tracking import MlflowSink, NullSink, SinkList, TensorBoardSink, naming
from optiscope.tracking.base import status_of


class Experiment(typing.Protocol):
    """What every experiment module provides (the CLI, the tests and CI rely on it):

    - `NAME`: its name on the command line and in the tracking back ends;
    - `DESCRIPTION`: one line for `optiscope list`;
    - `Config`: a frozen dataclass of the protocol (every number the result depends on, a
      `seed` among them), whose defaults are the full run and whose `Config.quick(seed=...)`
      is a reduced one for smoke tests;
    - `run(config, tracker=None, options=None) -> Result`: runs it, sending each setting to
      `tracker.setting(...)` (see `Tracker`) and showing `progress(...)`.
    """

    NAME: str
    DESCRIPTION: str
    Config: type

    def run(self, config, tracker=None, options=None): ...


@dataclasses.dataclass(frozen=True)
class Options:
    """Where an experiment writes. `track=False` writes result files only."""

    out: str = "results"
    logdir: str = "runs"
    tracking_uri: str | None = None
    track: bool = True
    progress: bool = True
    fit_progress: bool = False  # also the epochs of each model.fit (experiments that fit)


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
    tracker: object = None

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


def setting_name(label):
    """`label` as a directory name: runs of characters other than letters, digits, `.=_-`
    become `-` (`SGD momentum 0.9` -> `SGD-momentum-0.9`)."""
    return re.sub(r"[^A-Za-z0-9.=_-]+", "-", label).strip("-") or "_"


def lr_name(learning_rate):
    """`lr=<plain decimal>` (`lr=0.00001` ... `lr=1`): names sort in numeric order."""
    return f"lr={np.format_float_positional(float(learning_rate), trim='-')}"


def mlflow_experiment(experiment):
    """The MLflow experiment of an optiscope experiment."""
    return f"optiscope-{experiment}"


class Tracker:
    """Where one experiment run is tracked. With `run id` `<experiment>-<time stamp>`:

    - TensorBoard: `<logdir>/<experiment>/<run id>/best/<setting>` for the settings the result
      table compares (each optimizer's tuned setting), `.../grid/<setting>/lr=<rate>` for a
      learning-rate search, `.../summary` for the plots and the table;
    - MLflow, experiment `optiscope-<experiment>`: a parent run `<run id>` (params: the
      `Config`; metrics `summary/<setting>/<metric>`; the result files as artifacts), the
      best settings as top-level runs (tags `optiscope.role=best`, `optiscope.chosen=true`),
      the grid runs nested under the parent (`optiscope.role=grid`). Every run is tagged
      `optiscope.experiment` and `optiscope.run` (the run id). The experiment gets a saved
      view of its runs table (`RUNS_VIEW`): the parent and the best runs, with their learning
      rate and final metrics as columns, sorted by the first of those; the printed URL opens it.
    """

    def __init__(self, experiment, options, config=None):
        self.experiment = experiment
        self.options = options
        self.name = naming.run_name(experiment)
        self.urls = {}
        self.tags = {"optiscope.experiment": experiment, "optiscope.run": self.name}
        self.final_metrics = {}  # the best settings' final metrics, in the order first logged
        if not options.track:
            self.parent = NullSink()
            return
        self.board = TensorBoardSink(
            logdir=options.logdir, run_name=f"{experiment}/{self.name}", subdir="summary"
        )
        self.mlflow = MlflowSink(
            tracking_uri=options.tracking_uri,
            experiment_name=mlflow_experiment(experiment),
            run_name=self.name,
            tags={**self.tags, "optiscope.role": "parent"},
        )
        self.parent = SinkList([self.board, self.mlflow])
        if config is not None:
            self.mlflow.log_params(naming.flatten(_jsonable(dataclasses.asdict(config))))

    @property
    def tensorboard_dir(self):
        return os.path.join(self.options.logdir, self.experiment, self.name)

    def setting(self, label, params, group="best", tags=None):
        """Sinks for one setting (close them, e.g. `with tracker.setting(...) as sinks:`):
        `group="best"` for a row of the result table, `"grid"` for a search run (label
        `<optimizer>/lr=<rate>`). `params` (and `tags`) go to the setting's MLflow run."""
        if group not in ("best", "grid"):
            raise ValueError(f"Argument `group` must be 'best' or 'grid'. Received: {group!r}")
        if not self.options.track:
            return NullSink()
        path = "/".join(setting_name(part) for part in label.split("/"))
        tags = {**self.tags, **(tags or {}), "optiscope.role": group, "optiscope.setting": label}
        if group == "best":
            tags["optiscope.chosen"] = "true"
        sinks = Setting(
            [
                self.board.child(f"{group}/{path}"),
                self.mlflow.child(label, tags=tags, nested=group == "grid"),
            ],
            label=label,
            tracker=self,
            best=group == "best",
        )
        sinks.log_params(params)
        return sinks

    def finish(self, result, status="FINISHED"):
        if not self.options.track:
            return
        for name, figure in result.figures.items():
            self.board.log_figure(name, figure, step=1)
        self.board.log_event(result.table(), step=1)
        for path in result.files.values():
            self.mlflow.log_artifact(path, "results")
        self.mlflow.set_experiment_tags({VIEW_TAG_PREFIX + RUNS_VIEW: json.dumps(self.runs_view())})
        self.close(status)

    def runs_view(self):
        """The MLflow UI's view state (the keys of its "share view") that shows the comparison:
        grid runs filtered out, learning rate and final metrics as columns, best first."""
        metrics = [f"metrics.`{naming.mlflow_key('final/' + m)}`" for m in self.final_metrics]
        columns = ["params.`learning_rate`", *metrics[:MAX_VIEW_METRICS]]
        view = {
            "searchFilter": "tags.`optiscope.role` != 'grid'",
            "selectedColumns": columns,
            "columnWidths": {column: 170 for column in columns},
        }
        if metrics:
            view.update(orderByKey=metrics[0], orderByAsc=True)
        return view

    def close(self, status):
        if not self.options.track:
            return
        self.parent.close(status)
        self.urls = {"MLflow": self._mlflow_url(), "TensorBoard": self.tensorboard_dir}

    def _mlflow_url(self):
        """The experiment's page (its training runs) in the MLflow UI, or None."""
        experiment_id = self.mlflow.experiment_id
        if experiment_id is None:
            return None
        base = self.options.tracking_uri or ""
        if not base.startswith(("http://", "https://")):
            base = UI_MLFLOW  # where `optiscope ui` serves a local store
        return mlflow_runs_url(base, experiment_id)


def mlflow_runs_url(base, experiment_id):
    """The runs page of an experiment in the MLflow UI at `base`, with the saved view."""
    query = f"viewStateShareKey={RUNS_VIEW}&workflowType=machine_learning"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


RUNS_VIEW = "optiscope"  # the key of the saved view; MLflow keeps it as an experiment tag
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
MAX_VIEW_METRICS = 6
UI_MLFLOW = "http://127.0.0.1:5000"
UI_TENSORBOARD = "http://127.0.0.1:6006"


def text_table(records, columns, width=100, cell_width=22):
    """The result table for a terminal: as many leading columns as fit in `width`
    characters, cells cut to `cell_width`; returns `(text, columns left out)`."""

    def cut(text):
        return text if len(text) <= cell_width else text[: cell_width - 1] + "~"

    cells = {c: [cut(_cell(r.get(c, ""))) for r in records] for c in columns}
    widths = {c: max([len(cut(c)), *map(len, cells[c])]) for c in columns}
    shown, used = [], 0
    for column in columns:
        if used + widths[column] + (2 if shown else 0) > width:
            break
        shown.append(column)
        used += widths[column] + (2 if len(shown) > 1 else 0)
    lines = ["  ".join(cut(c).ljust(widths[c]) for c in shown).rstrip()]
    lines.append("  ".join("-" * widths[c] for c in shown))
    for i in range(len(records)):
        lines.append("  ".join(cells[c][i].ljust(widths[c]) for c in shown).rstrip())
    return "\n".join(lines), columns[len(shown) :]


class Setting(SinkList):
    """The sinks of one setting. It also sends the setting's final metrics (`log_hparams`) to
    the parent run as `summary/<setting>/<metric>`, names the setting and the optimizer's
    class in its HParams, writes a custom-scalar layout for the experiment's own series, and
    (for best settings) plots those series into `figures/curves.png` when it closes."""

    def __init__(self, sinks, label, tracker, best):
        super().__init__(sinks)
        self.label, self.tracker, self.best = label, tracker, best
        self.optimizer = None
        self.series = {}
        self._charted = set()

    def log_params(self, params):
        self.optimizer = params.get("optimizer.class", self.optimizer)
        super().log_params(params)

    def log_metrics(self, metrics, step):
        own = [tag for tag in metrics if not tag.startswith("optimizer/")]
        for tag in own:
            self.series.setdefault(tag, []).append((step, float(metrics[tag])))
        if set(own) - self._charted:
            self._charted |= set(own)
            super().log_layout(_experiment_charts(self._charted), category=self.tracker.experiment)
        super().log_metrics(metrics, step)

    def log_hparams(self, hparams, metrics):
        hparams = {**hparams, "setting": self.label}
        if self.optimizer is not None:
            hparams["optimizer"] = self.optimizer
        super().log_hparams(hparams, metrics)
        if self.best:
            for name in metrics:
                self.tracker.final_metrics.setdefault(name, None)
            key = setting_name(self.label)
            self.tracker.mlflow.log_metrics(
                {f"summary/{key}/{name}": value for name, value in metrics.items()}, step=1
            )

    def close(self, status="FINISHED"):
        if self.best and self.series and status == "FINISHED":
            figure = plot_series(self.series, self.label)
            self.log_figure("curves", figure, step=1)
            _close_figure(figure)
        super().close(status)


def _experiment_charts(tags):
    """One chart per first path component (`distance/...`), one per Keras key (`epoch/...`),
    as `Sink.log_layout` patterns."""
    charts = {}
    for tag in sorted(tags):
        parts = tag.split("/")
        title = "/".join(parts[:2]) if parts[0] == "epoch" else parts[0]
        charts.setdefault(title, []).append(tag)
    return {title: [publishing.chart_pattern(title, members)] for title, members in charts.items()}


def plot_series(series, title, limit=6):
    """Up to `limit` logged series of one run against their steps, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(series)[:limit]
    figure, axes = plt.subplots(
        1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False, layout="constrained"
    )
    for ax, name in zip(axes[0], names, strict=True):
        steps, values = np.asarray(series[name], "float64").T
        ax.plot(steps, values, lw=1.2)
        finite = values[np.isfinite(values)]
        if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 100:
            ax.set_yscale("log")
        ax.set(title=name, xlabel="step")
    figure.suptitle(title)
    return figure


def _close_figure(figure):
    import matplotlib.pyplot as plt

    plt.close(figure)


def progress(total, description, enabled=True, fits=False):
    """Progress on stderr: `with progress(n, "...") as advance: advance("label")`. A rich bar
    on a terminal; elsewhere (CI, a pipe) a plain line at most every `PLAIN_INTERVAL` seconds
    and at the end. With `fits=True`, `advance.fit(label)` gives Keras callbacks that also
    show the epochs of one `model.fit` (a second bar, or the plain line); otherwise none."""
    if not enabled:
        return contextlib.nullcontext(_Advance())
    if sys.stderr.isatty():
        return _RichProgress(total, description, fits)
    return _PlainProgress(total, description, fits)


PLAIN_INTERVAL = 10.0


class _Advance:
    """`advance(label=None)` counts one run done; `advance.fit(label)` is the list of Keras
    callbacks that report a fit's epochs (empty unless they were asked for)."""

    def __init__(self, done=None, epoch=None):
        self._done, self._epoch = done, epoch

    def __call__(self, label=None):
        if self._done is not None:
            self._done(label)

    def fit(self, label):
        if self._epoch is None:
            return []
        import keras

        report = self._epoch

        class FitProgress(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                report(label, 0, self.params["epochs"])

            def on_epoch_end(self, epoch, logs=None):
                report(label, epoch + 1, self.params["epochs"])

        return [FitProgress()]


class _RichProgress:
    def __init__(self, total, description, fits):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total)
        self._fit = self._progress.add_task("", total=1, visible=False) if fits else None

    def _epoch(self, label, done, total):
        if done == 0:  # a new fit: its own elapsed time
            self._progress.reset(self._fit, total=total, description=f"  {label}: epochs")
        self._progress.update(self._fit, completed=done, visible=True)

    def __enter__(self):
        self._progress.start()
        return _Advance(
            lambda label: self._progress.update(
                self._task, advance=1, **({"description": label} if label else {})
            ),
            self._epoch if self._fit is not None else None,
        )

    def __exit__(self, *exc):
        if self._fit is not None:
            self._progress.update(self._fit, visible=False)
        self._progress.stop()
        return False


class _PlainProgress:
    def __init__(self, total, description, fits):
        self.total, self.description, self.fits = total, description, fits
        self.done = 0
        self.label = description
        self.epochs = ""

    def _line(self):
        elapsed = time.monotonic() - self.start
        print(
            f"{self.label}: {self.done}/{self.total}{self.epochs} ({elapsed:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        self.last = time.monotonic()

    def _due(self):
        if time.monotonic() - self.last >= PLAIN_INTERVAL:
            self._line()

    def _advance(self, label):
        self.done += 1
        self.label = label or self.label
        self.epochs = ""
        self._due()

    def _epoch(self, label, done, total):
        self.epochs = f", {label}: epoch {done}/{total}"
        self._due()

    def __enter__(self):
        self.start = self.last = time.monotonic()
        print(f"{self.description}: {self.total} runs", file=sys.stderr, flush=True)
        return _Advance(self._advance, self._epoch if self.fits else None)

    def __exit__(self, *exc):
        self.epochs = ""
        self._line()
        return False


def run_tracked(module, config, options):
    """Runs an experiment module with tracking, writes its files, returns the Result (its
    `tracker` says where the runs are)."""
    tracker = Tracker(module.NAME, options, config)
    try:
        result = module.run(config, tracker=tracker, options=options)
    except BaseException as err:
        tracker.close(status_of(err))
        raise
    write(result, options.out)
    tracker.finish(result)
    result.tracker = tracker
    return result
