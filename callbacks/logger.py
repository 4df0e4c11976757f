"""`OptimizerStatsLogger`: reads an instrumented optimizer's statistics and hands them to sinks."""

import contextlib
import math
import sys
import threading

import keras
import numpy as np

from optiscope.callbacks import _live, _runs, publishing
from optiscope.callbacks.publishing import FIELDS, default_sinks
from optiscope.optimizers import unwrap
from optiscope.tracking import MlflowSink, NullSink, Sink, SinkList, journal, naming
from optiscope.tracking._checks import (
    check_bool,
    check_mapping,
    check_name,
    check_positive_int,
    writable_directory,
)
from optiscope.tracking.mlflow_sink import check_tracking_uri
from optiscope.tracking.tensorboard import DEFAULT_LOGDIR

DEFAULT_INTERVAL = 100
EPOCH_PREFIX = "epoch"
# Aggregates put into Keras' `logs` every epoch (so History, CSVLogger, the progress bar and
# Keras' TensorBoard callback record them): log key -> (statistic, how to combine groups).
LOG_KEYS = {
    "opt_learning_rate": ("learning_rate", "last"),
    "opt_global_grad_norm": ("global_grad_norm", "mean"),
    "opt_global_update_norm": ("global_update_norm", "mean"),
    "opt_effective_lr": ("effective_lr", "mean"),
    "opt_sign_flip_fraction": ("sign_flip_fraction", "mean"),
    "opt_sign_agreement": ("sign_agreement", "mean"),
}


def is_chief(model):
    """False on workers other than the chief of a multi-worker strategy, and in the processes
    other than the first of a multi-process JAX run."""
    if not _live.is_chief_process():
        return False
    strategy = getattr(model, "distribute_strategy", None)
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return True
    cluster = resolver.cluster_spec().as_dict()
    if not cluster:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if "chief" in cluster:
        return task_type == "chief"
    return task_type in (None, "worker") and (task_id or 0) == 0


class OptimizerStatsLogger(keras.callbacks.Callback):
    """Streams an instrumented optimizer's statistics to TensorBoard and MLflow.

    At every multiple of `interval` steps and at each epoch's end it reads all statistics in
    one transfer and sends them to the sinks through `publishing.Publisher`:
    `optimizer/<statistic>/<variable>` (the window's mean; other fields as
    `optimizer/<statistic>_<field>/<variable>`; running totals of counts as `..._total`), at
    the optimizer's update count as step. Each epoch it also puts a few aggregates into `logs`
    (`opt_learning_rate`, `opt_global_grad_norm`, `opt_global_update_norm`, `opt_effective_lr`,
    `opt_sign_flip_fraction`, `opt_sign_agreement`; left out where the optimizer has no such
    statistic), so Keras' History, CSVLogger, progress bar and TensorBoard callback record them
    too: put this callback before those in the list. The epoch's `logs` reach the sinks as
    `epoch/<key>` at the epoch number (an axis of their own). Params (optimizer class and
    config, model and data description) are logged when training begins; HParams and final
    metrics when it ends.

    It reads from Keras' callback thread (`async_safe`), so Keras keeps dispatching batches
    asynchronously. On JAX, whose trainer keeps the live state outside the model during an
    epoch, it reads on the training thread at the start of the batch after a due step, syncing
    the state back into the model only then (`model.jax_state_sync()`). A run that ends by an
    exception or Ctrl-C logs the steps since the last read and is marked FAILED/KILLED.

    Reads and points are keyed by the optimizer's step (`iterations`, read once when training
    begins), so a training resumed from a checkpoint reads and logs at the steps an
    uninterrupted one does; give it the same `run_name` (and the MLflow `run_id`) to continue
    the same run in both UIs. When training begins, journals of MLflow runs left undelivered
    by a process that died are named in a warning (see `optiscope replay --pending`).

    Args:
        sinks: a `Sink` or a list of them. Defaults to None: a `TensorBoardSink` under `logdir`
            and an `MlflowSink` to `tracking_uri`, both named `run_name`, which the logger
            closes when training ends (and says once where it logs).
        close_sinks: also end the runs of the given `sinks` when training ends (FINISHED,
            or FAILED/KILLED after an exception or Ctrl-C). Defaults to False: whoever
            creates a sink closes it.
        interval: read every this many steps. Defaults to 100.
        fields: which window fields to log, from "last", "mean", "max". Defaults to ("mean",).
        every_step: measure every step, so that each point is the mean (and max) over all the
            steps of its window, and running totals count every step; this costs the full
            statistics on every step. Defaults to False: only the steps that are logged (every
            `interval`-th step and each epoch's last) are measured, plus every step with a
            non-finite gradient, so each point is the exact value at its step and the divergence
            guard still finds the first non-finite gradient; the steps in between cost a
            finiteness check of the gradients (see `Instrumented.schedule_reads`).
        histograms: also log histograms of the optimizer's slots every epoch. Defaults to False.
        compact: one view per statistic across variables, for models with many: a histogram
            over the variables at each read (`optimizer/<statistic>/across_variables`) and a
            variable x step heat-map image at epoch ends (`optimizer/<statistic>/heatmap`, in
            MLflow a PNG artifact; drawn at most 5 % of the time, and at the end of training);
            the custom-scalar layout then keeps only charts of at most 10 lines. `"auto"`: when
            a statistic has more than 10 groups (variables or layers). Defaults to `"auto"`.
        logdir, run_name, tracking_uri, experiment_name: for the default sinks.
        run_id: the default `MlflowSink` continues this MLflow run. Defaults to None.
        params: extra parameters to log (e.g. a description of the data).
    """

    async_safe = True

    def __init__(
        self,
        sinks=None,
        interval=DEFAULT_INTERVAL,
        fields=("mean",),
        every_step=False,
        histograms=False,
        compact="auto",
        logdir=DEFAULT_LOGDIR,
        run_name=None,
        tracking_uri=None,
        experiment_name=None,
        params=None,
        close_sinks=False,
        run_id=None,
    ):
        super().__init__()
        self.interval = check_positive_int("interval", interval)
        fields = (fields,) if isinstance(fields, str) else tuple(fields)
        if not fields or any(f not in FIELDS for f in fields):
            raise ValueError(
                f"Argument `fields` must be a non-empty list of {FIELDS}. "
                f"Received: fields={fields!r}"
            )
        self.fields = fields
        self.every_step = check_bool("every_step", every_step)
        if sinks is not None:
            sinks = [sinks] if isinstance(sinks, Sink) else list(sinks)
            bad = [s for s in sinks if not isinstance(s, Sink)]
            if bad:
                raise TypeError(
                    f"Argument `sinks` must be a Sink or a list of Sinks. Received: {bad[0]!r}"
                )
        else:
            writable_directory("logdir", logdir)
            check_tracking_uri(tracking_uri)
        self._given_sinks = sinks
        self.close_sinks = check_bool("close_sinks", close_sinks) or sinks is None
        self._announced = False
        self.histograms = check_bool("histograms", histograms)
        if not (isinstance(compact, bool) or compact == "auto"):
            raise ValueError(
                f"Argument `compact` must be one of {publishing.COMPACT}. "
                f"Received: compact={compact!r}"
            )
        self.compact = compact
        self.logdir = logdir
        self.run_name = check_name("run_name", run_name)
        self.tracking_uri = tracking_uri
        self.experiment_name = check_name("experiment_name", experiment_name)
        self.run_id = check_name("run_id", run_id)
        self.extra_params = check_mapping("params", params)  # Keras' set_params owns `params`
        self.sinks = NullSink()
        self._open = False
        self._lock = threading.Lock()  # batch-end hooks may run on several Keras threads

    # ------------------------------------------------------------------ run lifecycle
    def on_train_begin(self, logs=None):
        _live.check_no_strategy()
        self.optimizer = unwrap(self.model.optimizer)
        if self.optimizer is None:
            name = type(self.model.optimizer).__name__
            raise ValueError(
                f"OptimizerStatsLogger needs an instrumented optimizer, but the model is compiled "
                f"with {name}, which has no statistics. Use optiscope.optimizers.Instrumented"
                f"{name} (or instrument(keras.optimizers.{name})), or one of optiscope's "
                "optimizers."
            )
        start = int(keras.ops.convert_to_numpy(self.optimizer.iterations))
        chief = is_chief(self.model)
        if not self.every_step:  # other workers log nothing: they measure no step
            self.optimizer.schedule_reads(
                self,
                every=self.interval if chief else None,
                epoch_steps=(self.params or {}).get("steps") if chief else None,
                start=start,
            )
        if chief:
            run_name = self.run_name or naming.run_name(publishing.optimizer_name(self.optimizer))
            sinks = self._given_sinks or default_sinks(
                self.logdir,
                run_name,
                self.tracking_uri,
                self.experiment_name,
                run_id=self.run_id,
                step=start,
            )
            for spool_dir in {s.spool_dir for s in sinks if isinstance(s, MlflowSink)}:
                journal.warn_pending(spool_dir)
            self.sinks = SinkList(sinks)
            if self._given_sinks is None and not self._announced:
                print(f"OptimizerStatsLogger: logging to {self.sinks.location()}", file=sys.stderr)
                self._announced = True
        else:
            self.sinks = NullSink()
        self._open = True
        if self.close_sinks:
            _runs.register(self)
        # Steps count from the optimizer's step, read once: reading it every batch would wait
        # for the device.
        self._batches = start
        self._epoch_start = start
        self._last_read = start
        self._publisher = publishing.Publisher(self.sinks, self.fields, compact=self.compact)
        self._epoch_window = {}
        self.sinks.log_params(self._describe())

    def on_train_end(self, logs=None):
        self._read_and_log()
        self._log_heatmaps(final=True)
        numbers_only = {
            k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float, np.number))
        }
        self.sinks.log_hparams(self._hparams(), numbers_only)
        self.close_run("FINISHED")

    def close_run(self, status):
        """Ends the run (FINISHED, FAILED or KILLED): closes the sinks this logger created
        (all of them with `close_sinks=True`), flushes the others; idempotent."""
        if self._open:
            with contextlib.suppress(Exception):  # a run that failed still closes
                self._read_and_log()  # the steps since the last read (an interrupted run)
            self._open = False
            self.optimizer.cancel_reads(self)
            _runs.unregister(self)
            if self.close_sinks:
                self.sinks.close(status)
            else:
                self.sinks.flush()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        self.close_run("FINISHED" if value is None else _runs.status_of(value))
        return False

    # ------------------------------------------------------------------ reading
    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_window = {}

    def on_train_batch_begin(self, batch, logs=None):
        steps = self._epoch_start + batch  # the steps run so far
        if _live.trainer_holds_state() and self._due(steps):
            self._read_and_log(steps)

    def on_train_batch_end(self, batch, logs=None):
        self._batches = self._epoch_start + batch + 1
        if not _live.trainer_holds_state() and self._due(self._batches):
            self._read_and_log(self._batches)

    def _due(self, steps):
        return steps // self.interval > self._last_read // self.interval

    def on_epoch_end(self, epoch, logs=None):
        self._epoch_start = self._batches
        self._read_and_log()
        if logs is not None:
            logs.update(self._epoch_aggregates())
            keras_logs = {f"{EPOCH_PREFIX}/{k}": float(v) for k, v in logs.items() if _is_number(v)}
            self.sinks.log_metrics(keras_logs, step=epoch + 1)
        self._log_heatmaps()
        if self.histograms:
            self.sinks.log_histograms(
                {
                    f"slots/{slot}/{key}": v
                    for (slot, key), v in self.optimizer.slot_values().items()
                },
                step=self.optimizer.iterations.numpy(),
            )

    def _read_and_log(self, steps=None):
        with self._lock:
            if not self._open or not self.optimizer.built:
                return
            self._last_read = self._batches if steps is None else steps
            _live.sync(self.model)  # on JAX, called on the training thread only
            stats = self.optimizer.statistics()
            self._log(stats)

    def _log(self, stats):
        if stats.steps == 0:
            return
        for key, summary in stats.items():
            window = self._epoch_window.setdefault(key, [0.0, 0, -math.inf, math.nan])
            window[0] += summary.mean * stats.steps
            window[1] += stats.steps
            window[2] = max(window[2], summary.max)
            window[3] = summary.last
        self._publisher.publish(stats)

    def _log_heatmaps(self, final=False):
        with self._lock:
            self._publisher.log_heatmaps(final)

    def _epoch_aggregates(self):
        aggregates = {}
        for key, (statistic, how) in LOG_KEYS.items():
            values = [
                (window[3] if how == "last" else window[0] / window[1])
                for (name, _), window in self._epoch_window.items()
                if name == statistic and window[1]
            ]
            if values:
                aggregates[key] = float(np.mean(values))
        return aggregates

    # ------------------------------------------------------------------ descriptions
    def _hparams(self):
        return publishing.optimizer_hparams(self.optimizer)

    def _describe(self):
        model = self.model
        params = publishing.describe_optimizer(self.optimizer)
        params["model.name"] = model.name
        params["model.class"] = type(model).__name__
        params["model.trainable_parameters"] = int(
            sum(np.prod(v.shape) for v in model.trainable_variables)
        )
        params["model.layers"] = ", ".join(layer.name for layer in model.layers)
        params.update(self.extra_params)
        return params


def _is_number(value):
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
