"""Compact views of a statistic across many variables.

A model with a hundred variables makes a hundred lines in a statistic's chart. These views show
each statistic in one picture instead: a histogram over the variables at each read
(`optimizer/<statistic>/across_variables`, TensorBoard's Histograms and Distributions tabs) and a
variable × step heat-map image (`optimizer/<statistic>/heatmap`, TensorBoard's Images tab, a PNG
artifact in MLflow). Both go to sinks through the ordinary `log_histograms` and `log_figure`.
"""

import functools
import io

import numpy as np
from matplotlib import colormaps, colors, font_manager, ticker
from PIL import Image, ImageDraw, ImageFont

PREFIX = "optimizer"
LOG_SCALE_SPAN = 100.0  # a colour scale in log10 once the positive values span two decades
ROW_PIXELS, MIN_PLOT_HEIGHT, PLOT_WIDTH, FONT_POINTS = 12, 120, 800, 10
_TOP, _BOTTOM, _GAP, _BAR_WIDTH, _BAR_LABELS = 28, 40, 8, 16, 80
_BAD = (211, 211, 211)  # light grey: NaN, Inf, or <= 0 on a log scale


class CompactViews:
    """Keeps the per-variable values of every statistic read so far and draws their views.

    Feed it each read with `add(stats)` (an optimizer's `Statistics`; the window mean of every
    statistic that has groups); `heatmaps()` draws one PNG image per statistic from all reads.
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
        """`{f"optimizer/<statistic>/heatmap": PNG bytes}` of each statistic with a finite value."""
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
    """A groups x steps heat-map of one statistic, as the bytes of a PNG image.

    Each cell spans the steps since the previous read, the window its mean covers; rows are
    labelled with the variable (or layer) paths, the first at the top. Values the colour scale
    cannot show (NaN, Inf, or <= 0 on a log scale) are grey. Drawn with Pillow, not a
    matplotlib figure: a hundred rows take milliseconds instead of about a second.
    """
    font = _font()
    norm = colour_scale(values)
    left, height = _layout(groups)
    width = left + PLOT_WIDTH + 2 * _GAP + _BAR_WIDTH + _BAR_LABELS
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    row_pixels = _row_pixels(groups)
    rows = len(groups) * row_pixels
    image.paste(Image.fromarray(_cells(values, steps, norm, row_pixels)), (left, _TOP))
    draw.rectangle((left - 1, _TOP - 1, left + PLOT_WIDTH, _TOP + rows), outline="black")
    for row, group in enumerate(groups):
        draw.text((left - 4, _TOP + (row + 0.5) * row_pixels), group, "black", font, "rm")
    for step in ticker.MaxNLocator(6, integer=True).tick_values(0, steps[-1]):
        if 0 <= step <= steps[-1]:
            x = left + step / steps[-1] * PLOT_WIDTH
            draw.line((x, _TOP + rows, x, _TOP + rows + 4), "black")
            draw.text((x, _TOP + rows + 6), f"{step:g}", "black", font, "ma")
    draw.text((left + PLOT_WIDTH / 2, height - 4), "step", "black", font, "md")
    scale = "log scale" if isinstance(norm, colors.LogNorm) else "linear scale"
    title = f"{statistic} per variable: mean since the previous read ({scale})"
    draw.text((left + PLOT_WIDTH / 2, _TOP / 2), title, "black", font, "mm")
    _colour_bar(draw, image, norm, left + PLOT_WIDTH + 2 * _GAP, rows, font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def cell_centre(groups, steps, row, read):
    """The pixel `(x, y)` at the centre of the cell of `groups[row]` at `steps[read]`."""
    left, _ = _layout(groups)
    start = steps[read - 1] if read else 0
    x = left + int((start + steps[read]) / 2 / steps[-1] * PLOT_WIDTH)
    row_pixels = _row_pixels(groups)
    return x, _TOP + row * row_pixels + row_pixels // 2


@functools.cache
def _font():
    path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"))
    return ImageFont.truetype(path, FONT_POINTS)


def _row_pixels(groups):
    return max(ROW_PIXELS, MIN_PLOT_HEIGHT // len(groups))


def _layout(groups):
    """`(left edge of the cells, image height)`."""
    left = _GAP + int(max(_font().getlength(g) for g in groups)) + 8
    return left, _TOP + len(groups) * _row_pixels(groups) + _BOTTOM


def _colours(values, norm):
    """RGB uint8 of `values` on `norm`'s scale, grey where it cannot show them."""
    shown = np.ma.masked_invalid(np.asarray(values, "float64"))
    if isinstance(norm, colors.LogNorm):
        shown = np.ma.masked_less_equal(shown, 0)
    cmap = colormaps["viridis"].with_extremes(bad=np.array(_BAD) / 255)
    return (cmap(norm(shown))[..., :3] * 255).round().astype(np.uint8)


def _cells(values, steps, norm, row_pixels):
    """The cells as pixels: `row_pixels` a row, each pixel column the read whose window holds
    it."""
    centres = (np.arange(PLOT_WIDTH) + 0.5) / PLOT_WIDTH * steps[-1]
    reads = np.minimum(np.searchsorted(np.asarray(steps, "float64"), centres), len(steps) - 1)
    pixels = _colours(values, norm)[:, reads]
    return np.repeat(pixels, row_pixels, axis=0)


def _colour_bar(draw, image, norm, left, rows, font):
    fractions = np.linspace(1.0, 0.0, rows)
    bar = _colours(norm.inverse(fractions)[:, None], norm)
    image.paste(Image.fromarray(np.repeat(bar, _BAR_WIDTH, axis=1)), (left, _TOP))
    draw.rectangle((left - 1, _TOP - 1, left + _BAR_WIDTH, _TOP + rows), outline="black")
    if isinstance(norm, colors.LogNorm):
        locator = ticker.LogLocator(numticks=6)
    else:
        locator = ticker.MaxNLocator(5)
    for value in locator.tick_values(norm.vmin, norm.vmax):
        if norm.vmin <= value <= norm.vmax:
            y = _TOP + (1.0 - float(norm(value))) * (rows - 1)
            draw.line((left + _BAR_WIDTH, y, left + _BAR_WIDTH + 3, y), "black")
            draw.text((left + _BAR_WIDTH + 5, y), f"{value:.3g}", "black", font, "lm")


def groups_per_statistic(keys):
    """The number of groups (lines in one statistic's chart) among `(statistic, group)` keys."""
    counts = {}
    for statistic, group in keys:
        if group is not None:
            counts[statistic] = counts.get(statistic, 0) + 1
    return max(counts.values(), default=0)
