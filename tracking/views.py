"""Compact views of a statistic across many variables.

A model with a hundred variables makes a hundred lines in a statistic's chart. These views show
each statistic in one picture instead: a histogram over the variables at each read
(`optimizer/<statistic>/across_variables`, TensorBoard's Histograms and Distributions tabs) and a
variable × step heat-map image (`optimizer/<statistic>/heatmap`, TensorBoard's Images tab, a PNG
artifact in MLflow). Both go to sinks through the ordinary `log_histograms` and `log_figure`.
"""

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.figure import Figure

PREFIX = "optimizer"
LOG_SCALE_SPAN = 100.0  # a colour scale in log10 once the positive values span two decades
_WIDTH_INCHES, _ROW_INCHES, _MARGIN_INCHES = 10.0, 0.14, 1.0
_LABEL_POINTS, _LABEL_INCHES = 7, 0.055  # y labels: font size and the width of one character


class CompactViews:
    """Keeps the per-variable values of every statistic read so far and draws their views.

    Feed it each read with `add(stats)` (an optimizer's `Statistics`; the window mean of every
    statistic that has groups); `heatmaps()` draws one figure per statistic from all reads.
    """

    def __init__(self):
        self.steps = []  # the step of each read
        self.groups = {}  # statistic -> its groups (variables or layers), in the optimizer's order
        self._values = {}  # statistic -> one array of per-group values per read

    def add(self, stats):
        """Records one read; returns its histograms: `{tag: per-group values}`."""
        rows = {}
        for (statistic, group), summary in stats.items():
            if group is not None:
                rows.setdefault(statistic, {})[group] = summary.mean
        self.steps.append(int(stats.step))
        histograms = {}
        for statistic, values in rows.items():
            self.groups.setdefault(statistic, list(values))
            row = np.array([values[g] for g in self.groups[statistic]], "float64")
            self._values.setdefault(statistic, []).append(row)
            finite = row[np.isfinite(row)]
            if finite.size:
                histograms[f"{PREFIX}/{statistic}/across_variables"] = finite
        return histograms

    def matrix(self, statistic):
        """`(groups, steps, values)`: the values as a groups × reads array."""
        return self.groups[statistic], list(self.steps), np.stack(self._values[statistic], axis=1)

    def heatmaps(self):
        """`{f"optimizer/<statistic>/heatmap": Figure}` for every statistic with a finite value."""
        figures = {}
        for statistic in self._values:
            groups, steps, values = self.matrix(statistic)
            if np.isfinite(values).any():
                figures[f"{PREFIX}/{statistic}/heatmap"] = heatmap(statistic, groups, steps, values)
        return figures


def colour_scale(values):
    """`LogNorm` where the positive values span two decades or more, else a linear `Normalize`."""
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if positive.size and positive.max() / positive.min() >= LOG_SCALE_SPAN:
        return colors.LogNorm(vmin=positive.min(), vmax=positive.max())
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    return colors.Normalize(vmin=low, vmax=high if high > low else low + 1.0)


def heatmap(statistic, groups, steps, values):
    """A groups × steps heat-map of one statistic (a matplotlib `Figure`, no pyplot state).

    Each cell spans the steps since the previous read, the window its mean covers; rows are
    labelled with the variable (or layer) paths, the first at the top. Values the colour scale
    cannot show (NaN, Inf, or <= 0 on a log scale) are grey.
    """
    width = _WIDTH_INCHES
    height = _MARGIN_INCHES + _ROW_INCHES * max(len(groups), 8)
    left = 0.3 + _LABEL_INCHES * max(len(g) for g in groups)
    figure = Figure(figsize=(width, height))
    bottom, top = 0.55 / height, 1 - 0.4 / height
    axes = figure.add_axes((left / width, bottom, 1 - (left + 1.3) / width, top - bottom))
    colour_bar = figure.add_axes((1 - 1.15 / width, bottom, 0.15 / width, top - bottom))
    norm = colour_scale(values)
    shown = np.ma.masked_invalid(values)
    if isinstance(norm, colors.LogNorm):
        shown = np.ma.masked_less_equal(shown, 0)
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")  # a copy
    mesh = axes.pcolormesh([0, *steps], np.arange(len(groups) + 1), shown, norm=norm, cmap=cmap)
    axes.set_yticks(np.arange(len(groups)) + 0.5, groups, fontsize=_LABEL_POINTS)
    axes.set_ylim(len(groups), 0)
    axes.set_xlabel("step")
    scale = "log scale" if isinstance(norm, colors.LogNorm) else "linear scale"
    axes.set_title(f"{statistic} per variable: mean since the previous read ({scale})")
    figure.colorbar(mesh, cax=colour_bar, label=statistic)
    return figure


def groups_per_statistic(keys):
    """The number of groups (lines in one statistic's chart) among `(statistic, group)` keys."""
    counts = {}
    for statistic, group in keys:
        if group is not None:
            counts[statistic] = counts.get(statistic, 0) + 1
    return max(counts.values(), default=0)
