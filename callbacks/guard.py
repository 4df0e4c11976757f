"""`DivergenceGuard`: stops (or warns) when training diverges, and says where it began."""

import math
import warnings

import keras

from optiscope.callbacks import _live
from optiscope.optimizers import unwrap
from optiscope.tracking import NullSink, Sink, SinkList
from optiscope.tracking._checks import check_choice, check_name, check_positive_int

ACTIONS = ("stop", "warn")
TRIGGERS = ("nonfinite", "nan")


class DivergenceGuard(keras.callbacks.Callback):
    """Watches the loss and, with an instrumented optimizer, every measured gradient.

    When the monitored loss or a gradient norm becomes non-finite (`trigger="nonfinite"`) or
    NaN (`trigger="nan"`, the definition of "exploded" used by the convergence experiments), it
    stops training (or only warns), and its message, `report` and the sinks name the step, the
    statistic and variable that showed it, and where the first non-finite value appeared.

    It checks after every `check_every` steps; each check reads the statistics (one transfer,
    without starting a new window), so Keras dispatches these batches synchronously. On JAX
    each check also syncs the trainer's live state into the model (`model.jax_state_sync()`):
    a larger `check_every` makes checks cheaper there.

    Args:
        action: "stop" or "warn". Defaults to "stop".
        trigger: "nonfinite" (NaN or Inf) or "nan". Defaults to "nonfinite".
        monitor: the `logs` key of the loss. Defaults to "loss".
        sinks: a `Sink` or list of sinks that also get the report. Defaults to None.
        check_every: check after every this many steps. Defaults to 1.
    """

    def __init__(
        self, action="stop", trigger="nonfinite", monitor="loss", sinks=None, check_every=1
    ):
        super().__init__()
        self.action = check_choice("action", action, ACTIONS)
        self.trigger = check_choice("trigger", trigger, TRIGGERS)
        self.monitor = check_name("monitor", monitor, optional=False)
        self.check_every = check_positive_int("check_every", check_every)
        sinks = [] if sinks is None else [sinks] if isinstance(sinks, Sink) else list(sinks)
        bad = [s for s in sinks if not isinstance(s, Sink)]
        if bad:
            raise TypeError(
                f"Argument `sinks` must be a Sink or a list of Sinks. Received: {bad[0]!r}"
            )
        self.sinks = SinkList(sinks) if sinks else NullSink()
        self.report = None

    def on_train_begin(self, logs=None):
        _live.check_no_strategy()
        self.optimizer = unwrap(self.model.optimizer)
        self.report = None
        start = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self._steps = start
        self._epoch_start = start
        self._monitor_checked = False

    def on_epoch_end(self, epoch, logs=None):
        self._epoch_start = self._steps
        if not self._monitor_checked and logs is not None:
            self._monitor_checked = True
            if self.monitor not in logs:
                warnings.warn(
                    f"optiscope: DivergenceGuard's `monitor` key {self.monitor!r} is not in the "
                    f"logs of this training (keys: {sorted(logs)}); only gradients are checked",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def on_train_batch_end(self, batch, logs=None):
        self._steps = self._epoch_start + batch + 1
        if self.report is not None or self._steps % self.check_every:
            return
        loss = (logs or {}).get(self.monitor)
        bad_loss = loss is not None and self._bad(float(loss))
        stats = self._statistics()
        bad_gradient = None
        if stats is not None:
            for (name, group), summary in stats.items():
                if name in ("grad_norm", "global_grad_norm") and self._bad(summary.last):
                    bad_gradient = (name, group, summary.last)
                    break
        if bad_loss or bad_gradient:
            self._diverged(loss if bad_loss else None, bad_gradient, stats)

    def _statistics(self):
        if self.optimizer is None or not self.optimizer.built:
            return None
        _live.sync(self.model)
        return self.optimizer.statistics(reset=False)

    def _bad(self, value):
        return math.isnan(value) if self.trigger == "nan" else not math.isfinite(value)

    def _diverged(self, loss, gradient, stats):
        # the step of the gradient that showed it (the optimizer's), else of this batch
        step = stats.step if gradient is not None else self._steps
        kind = "NaN" if self.trigger == "nan" else "non-finite"
        if gradient is not None:
            name, group, value = gradient
            what = f"{name} of {group!r} became {value}" if group else f"{name} became {value}"
        else:
            what = f"the {self.monitor} became {loss}"
        report = {"step": step, "statistic": None, "variable": None, "value": None}
        if gradient is not None:
            report.update(statistic=gradient[0], variable=gradient[1], value=gradient[2])
        message = f"Training diverged at step {step}: {what} ({kind} trigger)."
        first = stats.first_nonfinite() if stats is not None else None
        if first is not None:
            began, name, group = first
            report.update(began_at=began, first_statistic=name, first_variable=group)
            message += (
                f" It began at step {began}, when {name}"
                f"{f' of {group!r}' if group else ''} first became non-finite."
            )
            if report["variable"] is None:
                report.update(statistic=name, variable=group)
        report["message"] = message
        self.report = report
        self.sinks.log_event(message, step)
        self.sinks.log_metrics({"diverged_at_step": step}, step)
        self.sinks.flush()
        if self.action == "stop":
            self.model.stop_training = True
            print(message)
        else:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
