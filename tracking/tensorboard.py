"""TensorBoard sink: event files in a run directory of its own.

Written with TensorBoard's own event-file writer (a background thread), never through Keras'
TensorBoard callback writer, so both can run side by side: Keras writes `<run>/train`, this sink
`<run>/optiscope`.
"""

import contextlib
import glob
import json
import os
import struct
import threading
import time

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary
from tensorboard.plugins.histogram.summary_v2 import histogram_pb
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from optiscope.tracking import naming
from optiscope.tracking._checks import (
    check_name,
    check_path,
    check_positive,
    check_positive_int,
    writable_directory,
)
from optiscope.tracking.base import STATISTICS_CATEGORY, Sink, png

DEFAULT_LOGDIR = "runs"
ROOT_INDEX = ".optiscope-root.json"  # in the log directory: HParams columns, category order
_ROOT_SUFFIX = ".root"  # of the root event file that holds them


class TensorBoardSink(Sink):
    """Scalars, histograms, images, a custom-scalar layout, HParams and text events.

    Args:
        logdir: the TensorBoard log directory. Defaults to "runs".
        run_name: the run's directory under `logdir`. Defaults to a time-stamped name.
        subdir: this sink's directory inside the run. Defaults to "optiscope"; None writes
            into the run's directory itself.
        flush_secs: how often the writer thread flushes. Defaults to 5.
        purge_step: continue an existing run directory from this step: TensorBoard drops the
            points the run's earlier files have at this step and later (e.g. those logged after
            the checkpoint a training resumes from). Defaults to None.

    `child(name)` writes into `<logdir>/<run_name>/<name>`, a run of its own in TensorBoard.
    """

    def __init__(
        self,
        logdir=DEFAULT_LOGDIR,
        run_name=None,
        subdir="optiscope",
        flush_secs=5,
        purge_step=None,
    ):
        if not isinstance(logdir, (str, os.PathLike)):
            raise TypeError(f"Argument `logdir` must be a path. Received: logdir={logdir!r}")
        self.logdir = logdir
        self.run_name = check_name("run_name", run_name) or naming.run_name()
        if subdir is not None:
            check_path("subdir", check_name("subdir", subdir, optional=False))
        self.subdir = subdir
        path = os.path.join(logdir, self.run_name, *([subdir] if subdir else []))
        self.path = writable_directory("logdir", path)
        self.flush_secs = check_positive("flush_secs", flush_secs)
        if purge_step is not None:
            purge_step = check_positive_int("purge_step", purge_step)
        self.purge_step = purge_step
        self._writer = None
        self._layout = {}
        self._lock = threading.Lock()

    def child(self, name, tags=None, nested=True):
        return TensorBoardSink(
            self.logdir, f"{self.run_name}/{name}", subdir=None, flush_secs=self.flush_secs
        )

    def location(self):
        return self.path

    def _write(self, summary, step):
        with self._lock:
            if self._writer is None:
                self._writer = EventFileWriter(self.path, flush_secs=self.flush_secs)
                if self.purge_step is not None:  # TensorBoard purges steps >= a restart's
                    restart = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
                    self._writer.add_event(
                        event_pb2.Event(
                            wall_time=time.time(), step=self.purge_step, session_log=restart
                        )
                    )
            if not isinstance(summary, summary_pb2.Summary):  # TensorFlow's own Summary class
                summary = summary_pb2.Summary.FromString(summary.SerializeToString())
            event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
            self._writer.add_event(event)

    def log_metrics(self, metrics, step):
        values = [
            summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in metrics.items()
        ]
        self._write(summary_pb2.Summary(value=values), step)

    def log_histograms(self, histograms, step):
        summary = summary_pb2.Summary()
        for tag, data in histograms.items():
            summary.value.extend(histogram_pb(tag, np.asarray(data, "float64").ravel()).value)
        self._write(summary, step)

    def log_figure(self, name, figure, step):
        image_bytes = png(figure)
        width, height = struct.unpack(">II", image_bytes[16:24])  # from the PNG header
        image = summary_pb2.Summary.Image(
            height=height, width=width, colorspace=4, encoded_image_string=image_bytes
        )
        self._write(
            summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=name, image=image)]), step
        )

    def log_layout(self, charts, category=STATISTICS_CATEGORY):
        """Adds `charts` under `category` to this run's custom-scalar layout (TensorBoard
        keeps the latest layout of a run, so the whole layout is written again). The run's
        own categories come first, the statistics last."""
        self._layout.setdefault(category, {}).update(charts)
        if STATISTICS_CATEGORY in self._layout:
            self._layout[STATISTICS_CATEGORY] = self._layout.pop(STATISTICS_CATEGORY)
        _update_root(self.logdir, lambda index: _add_categories(index["categories"], [category]))
        categories = [
            layout_pb2.Category(
                title=title,
                chart=[
                    layout_pb2.Chart(
                        title=chart,
                        multiline=layout_pb2.MultilineChartContent(tag=list(patterns)),
                    )
                    for chart, patterns in group.items()
                ],
            )
            for title, group in self._layout.items()
        ]
        self._write(custom_scalar_summary.pb(layout_pb2.Layout(category=categories)), 0)

    def log_hparams(self, hparams, metrics):
        """The run's hyperparameters and final metrics (`hparams/<name>`). The HParams columns
        are those of the whole log directory (see `_update_root`)."""
        values = {name: _hparam_value(value) for name, value in hparams.items()}
        tags = {f"hparams/{name}": value for name, value in metrics.items()}
        _update_root(self.logdir, lambda index: _add_columns(index, values, tags))
        self._write(hparams_summary.hparams_pb(values, trial_id=self.run_name), 0)
        self.log_metrics(tags, 0)

    def log_event(self, message, step):
        self._write(text_pb("events", message), step)

    def flush(self):
        with self._lock:
            if self._writer is not None:
                self._writer.flush()

    def close(self, status="FINISHED"):
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
                if self._layout:  # the run closed last opens Custom Scalars (see `_update_root`)
                    order = list(self._layout)
                    _update_root(
                        self.logdir, lambda i: _add_categories(i["categories"], order, True)
                    )


def _update_root(logdir, update):
    """Applies `update(index)` to what the log directory's root run holds: the HParams columns
    (`hparams`, `metrics`) and the custom-scalar category order (`categories`). `update`
    returns whether it changed anything; the root's event file is rewritten only then. Safe
    across processes where `fcntl` is.

    TensorBoard's HParams dashboard shows the first experiment summary it finds, so runs that
    each wrote their own would show one run's columns only: runs write none, the root holds one
    with every name any run logged. Custom Scalars merges the runs' layouts in the order of
    their names and keeps the first run's category order; the root (run `.`) comes first, so
    its layout (categories without charts) sets the order: the categories of the run closed
    last first (an experiment's own before the statistics), then the others.
    """
    os.makedirs(logdir, exist_ok=True)
    index_path = os.path.join(logdir, ROOT_INDEX)
    with open(index_path + ".lock", "a") as lock:
        with contextlib.suppress(ImportError):
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(index_path) as handle:
                index = json.load(handle)
        except (OSError, ValueError):
            index = {}
        for key in ("hparams", "metrics", "categories"):
            index.setdefault(key, [])
        if not update(index):
            return
        summaries = []
        if index["hparams"] or index["metrics"]:
            hparams = [hparams_summary.HParam(name) for name in index["hparams"]]
            metrics = [hparams_summary.Metric(tag) for tag in index["metrics"]]
            summaries.append(hparams_summary.hparams_config_pb(hparams=hparams, metrics=metrics))
        if index["categories"]:
            titles = index["categories"]
            order = layout_pb2.Layout(category=[layout_pb2.Category(title=t) for t in titles])
            summaries.append(custom_scalar_summary.pb(order))
        for old in glob.glob(os.path.join(logdir, f"events.out.tfevents.*{_ROOT_SUFFIX}")):
            os.remove(old)
        writer = EventFileWriter(logdir, filename_suffix=_ROOT_SUFFIX)
        for summary in summaries:
            summary = summary_pb2.Summary.FromString(summary.SerializeToString())
            writer.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))
        writer.close()
        with open(index_path + ".tmp", "w") as handle:
            json.dump(index, handle, indent=1)
        os.replace(index_path + ".tmp", index_path)


def _add_columns(index, hparams, metric_tags):
    new_hparams = [n for n in hparams if n not in index["hparams"]]
    new_metrics = [t for t in metric_tags if t not in index["metrics"]]
    index["hparams"] += new_hparams
    index["metrics"] += new_metrics
    return bool(new_hparams or new_metrics)


def _add_categories(categories, new, first=False):
    """Adds the categories `new` to the root's order, at the end; with `first`, moves them to
    the front in their order. Returns whether the order changed."""
    rest = [c for c in categories if c not in new]
    order = [*new, *rest] if first else [*categories, *(c for c in new if c not in categories)]
    changed = order != categories
    categories[:] = order
    return changed


def _hparam_value(value):
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
