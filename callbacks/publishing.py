"""The one path from an optimizer's statistics to sinks, used by `OptimizerStatsLogger` and by
custom training loops alike, and the names and descriptions every run shares.

A read is sent as `optimizer/<statistic>/<group>` (the window's mean), other window fields as
`optimizer/<statistic>_<field>/<group>`, running totals of counts as `optimizer/<statistic>_total/
<group>`, all at the optimizer's update count as step; the first read also writes a custom-scalar
layout with one chart per statistic across groups. Statistics an optimizer does not measure are
absent from its read, so they are never sent.
"""

import re
import time

from optiscope.optimizers import instrumentation
from optiscope.optimizers.measures import STATISTICS
from optiscope.tracking import MlflowSink, TensorBoardSink, naming
from optiscope.tracking.views import CompactViews, groups_per_statistic

PREFIX = "optimizer"
FIELDS = ("last", "mean", "max")
COMPACT = ("auto", True, False)
COMPACT_ABOVE = 10  # `compact="auto"`: compact views once a statistic has more groups than this
HEATMAP_SHARE = 0.05  # of the training time, at most, spent drawing heat-maps


def tag(statistic, group=None):
    """`optimizer/<statistic>[/<group>]`."""
    return f"{PREFIX}/{statistic}" if group is None else f"{PREFIX}/{statistic}/{group}"


def metrics(statistics, fields=("mean",)):
    """`{tag: value}` of one statistics read, for the given window fields."""
    values = {}
    for (name, group), summary in statistics.items():
        for field in fields:
            suffix = "" if field == "mean" else f"_{field}"
            values[tag(name + suffix, group)] = getattr(summary, field)
        if name in STATISTICS and STATISTICS[name].cumulative:
            values[tag(name + "_total", group)] = summary.total
    return values


def charts(tags):
    """One chart per statistic (and per slot of `slot_norm`): `{title: its tags}`."""
    grouped = {}
    for name in tags:
        parts = name.split("/")
        statistic = "/".join(parts[1:3]) if parts[1] == "slot_norm" else parts[1]
        grouped.setdefault(statistic, []).append(name)
    return grouped


def patterns(charts):
    """`{title: [regular expression]}` of `charts` for `Sink.log_layout`: a chart draws every
    tag under its name (`^optimizer/grad_norm/`), whatever the model's variables, so that runs
    of different models share one chart instead of showing each other's tags as missing."""
    return {title: [chart_pattern(title, tags)] for title, tags in charts.items()}


def chart_pattern(prefix, tags):
    """The tag itself where the chart draws just `prefix` (a global value), else every tag
    under `prefix/`."""
    full = tag(prefix) if tags and tags[0].startswith(PREFIX + "/") else prefix
    return f"^{re.escape(full)}$" if list(tags) == [full] else f"^{re.escape(full)}/"


class Publisher:
    """Sends statistics reads to `sinks`; the first non-empty read also writes the layout.

    `publish(statistics)` sends a read already taken; `read(optimizer)` takes one (resetting
    the window) and sends it, the first time also the optimizer's class and config as params
    (`describe=True`, for custom loops; the Keras callback describes the model too). Both
    return the metrics sent (empty when no step ran). With `compact` on (`"auto"`: once a
    statistic has more than `COMPACT_ABOVE` groups) each read also sends a histogram over the
    groups per statistic, `log_heatmaps()` a group x step heat-map per statistic, and the layout
    keeps only the charts of at most `COMPACT_ABOVE` lines.
    """

    def __init__(self, sinks, fields=("mean",), describe=False, compact=False):
        if compact not in COMPACT or not isinstance(compact, bool | str):
            raise ValueError(
                f"Argument `compact` must be one of {COMPACT}. Received: compact={compact!r}"
            )
        self.sinks = sinks
        self.fields = tuple(fields)
        self.describe = describe
        self.compact = compact
        self._views = None  # CompactViews, or False; decided at the first read
        self._heatmaps_drawn, self._heatmaps_at, self._heatmap_seconds = 0, 0.0, 0.0
        self._layout_written = False

    def publish(self, statistics):
        if statistics.steps == 0:
            return {}
        values = metrics(statistics, self.fields)
        if self._views is None:
            many = groups_per_statistic(statistics.keys()) > COMPACT_ABOVE
            wanted = self.compact is True or (self.compact == "auto" and many)
            self._views = CompactViews() if wanted else False
        if not self._layout_written:
            layout = charts(values)
            if self._views:
                layout = {t: tags for t, tags in layout.items() if len(tags) <= COMPACT_ABOVE}
            self.sinks.log_layout(patterns(layout))
            self._layout_written = True
        self.sinks.log_metrics(values, step=statistics.step)
        if self._views:
            self.sinks.log_histograms(self._views.add(statistics), step=statistics.step)
        return values

    def log_heatmaps(self, final=False):
        """A heat-map per statistic of every read so far (at the last read's step), unless no
        read is new. They take at most `HEATMAP_SHARE` of the time (about 0.1 s a statistic for
        100 variables on 2 cores): a call sooner after the last drawing is skipped, unless
        `final` (the end of training)."""
        if not self._views or len(self._views.steps) == self._heatmaps_drawn:
            return
        if (
            not final
            and time.monotonic() - self._heatmaps_at < self._heatmap_seconds / HEATMAP_SHARE
        ):
            return
        start = time.monotonic()
        for name, figure in self._views.heatmaps().items():
            self.sinks.log_figure(name, figure, step=self._views.steps[-1])
        self._heatmaps_at = time.monotonic()
        self._heatmap_seconds = self._heatmaps_at - start
        self._heatmaps_drawn = len(self._views.steps)

    def read(self, optimizer):
        if self.describe:
            self.sinks.log_params(describe_optimizer(optimizer))
            self.describe = False
        optimizer = instrumentation.unwrap(optimizer)
        if optimizer is None or not optimizer.built:
            return {}
        return self.publish(optimizer.statistics())


def optimizer_name(optimizer):
    """The class a user would type: `Adam` for `InstrumentedAdam`, `SignAveraging` for itself."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    if cls.__module__ == instrumentation.__name__ and instrumentation.Instrumented in cls.__bases__:
        cls = cls.__bases__[-1]
    return cls.__name__


def describe_optimizer(optimizer):
    """Params: `optimizer.class` and the full config as `optimizer.<key>`."""
    params = {"optimizer.class": optimizer_name(optimizer)}
    if hasattr(optimizer, "get_config"):
        config = naming.flatten(optimizer.get_config())
        params.update({f"optimizer.{k}": v for k, v in config.items()})
    return params


def optimizer_hparams(optimizer):
    """HParams: `optimizer` (the class name) and the config's scalar values."""
    hparams = {"optimizer": optimizer_name(optimizer)}
    if hasattr(optimizer, "get_config"):
        config = naming.flatten(optimizer.get_config())
        hparams.update({k: v for k, v in config.items() if _is_scalar(v) and k != "name"})
    return hparams


def default_sinks(logdir, run_name, tracking_uri=None, experiment_name=None, run_id=None, step=0):
    """The sinks a run gets unless told otherwise: a `TensorBoardSink` under `logdir` and an
    `MlflowSink` (continuing `run_id` if given); from optimizer step `step` > 0 (a resumed
    training) TensorBoard drops what the run directory holds after that step."""
    return [
        TensorBoardSink(logdir=logdir, run_name=run_name, purge_step=step + 1 if step else None),
        MlflowSink(
            tracking_uri=tracking_uri,
            experiment_name=experiment_name,
            run_name=run_name,
            run_id=run_id,
        ),
    ]


def _is_scalar(value):
    return isinstance(value, (bool, int, float, str)) or value is None
