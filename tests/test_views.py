"""Compact views of a model with 100 variables (50 Dense layers), read back from real servers.

One fit logs to a `TensorBoardSink`, an `MlflowSink` on a real `mlflow server` and a recording
sink. TensorBoard's HTTP API must hold, for every statistic, a histogram over the variables at
each read whose buckets count exactly the per-variable values the logger read, and heat-map
images at the epoch ends their time share allows and at the end of training; its custom-scalar
layout must have no 100-line chart. MLflow keeps one
heat-map artifact per statistic. The heat-map figure itself is checked against the values it draws.
"""

import io
import math
import struct
import urllib.parse

import keras
import numpy as np
import pytest
import servers
from matplotlib import colormaps, colors
from mlflow.tracking import MlflowClient
from PIL import Image
from test_tracking_servers import RecordingSink, make_data, make_model, tb_poll

from optiscope.callbacks import OptimizerStatsLogger, publishing
from optiscope.optimizers import DEFAULT_STATISTICS, InstrumentedAdam, variable_keys
from optiscope.optimizers.instrumentation import Statistics
from optiscope.tracking import MlflowSink, TensorBoardSink
from optiscope.tracking.views import CompactViews, cell_centre, heatmap

LAYERS, WIDTH, ROWS, BATCH, EPOCHS, INTERVAL = 50, 4, 128, 32, 3, 2
STEPS_PER_EPOCH = ROWS // BATCH  # 4
READ_STEPS = list(range(INTERVAL, STEPS_PER_EPOCH * EPOCHS + 1, INTERVAL))  # epoch ends included
RUN = "deep/optiscope"


class FigureRecorder(RecordingSink):
    """A recording sink that also keeps histograms' and figures' names and steps."""

    def __init__(self):
        super().__init__()
        self.figures = []

    def log_figure(self, name, figure, step):
        self.figures.append((name, int(step)))


def deep_model():
    layers = [
        keras.layers.Dense(WIDTH, activation="tanh", name=f"dense_{i:02d}") for i in range(LAYERS)
    ]
    model = keras.Sequential([keras.Input((WIDTH,)), *layers], name="deep")
    model.compile(optimizer=InstrumentedAdam(learning_rate=0.01), loss="mse")
    return model


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    """One fit of the 100-variable model (compact views by default), then both servers."""
    root = tmp_path_factory.mktemp("views")
    keras.utils.set_random_seed(0)
    model = deep_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, WIDTH)).astype("float32")
    y = np.tanh(x[:, ::-1]).astype("float32")
    with servers.mlflow_server(root / "mlflow") as mlflow_url:
        board = TensorBoardSink(logdir=root / "logs", run_name="deep")
        mlflow = MlflowSink(tracking_uri=mlflow_url, experiment_name="views", run_name="deep")
        recorder = FigureRecorder()
        logger = OptimizerStatsLogger(
            sinks=[board, mlflow, recorder], interval=INTERVAL, close_sinks=True
        )
        model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
                  callbacks=[logger])  # fmt: skip
        assert mlflow.spool_path is None, mlflow.last_error
        with servers.tensorboard_server(root / "logs") as tensorboard_url:
            yield {
                "tensorboard": tensorboard_url,
                "mlflow": MlflowClient(mlflow_url),
                "run_id": mlflow.run_id,
                "recorder": recorder,
                "keys": variable_keys(model.trainable_variables),
            }


def per_variable(recorder, statistic, keys, step):
    """The per-variable values the logger read for `statistic` at `step`."""
    first = f"optimizer/{statistic}/{keys[0]}"
    (metrics,) = [m for m, s in recorder.metrics if s == step and first in m]
    return np.array([metrics[f"optimizer/{statistic}/{key}"] for key in keys])


def test_the_model_has_100_variables(deep_run):
    assert len(deep_run["keys"]) == 2 * LAYERS == 100
    assert set(deep_run["keys"]) == {
        f"dense_{i:02d}/{part}" for i in range(LAYERS) for part in ("kernel", "bias")
    }


def test_histograms_over_variables_hold_the_values_read(deep_run):
    url, recorder, keys = deep_run["tensorboard"], deep_run["recorder"], deep_run["keys"]
    tags = {f"optimizer/{s}/across_variables" for s in DEFAULT_STATISTICS}
    tb_poll(url, "/data/plugin/histograms/tags", lambda t: tags <= set(t.get(RUN, {})))
    for statistic in DEFAULT_STATISTICS:
        query = urllib.parse.urlencode(
            {"run": RUN, "tag": f"optimizer/{statistic}/across_variables"}
        )
        series = servers.get_json(f"{url}/data/plugin/histograms/histograms?{query}")
        assert [step for _, step, _ in series] == READ_STEPS, statistic
        for _, step, buckets in series:
            values = per_variable(recorder, statistic, keys, step)
            assert np.isfinite(values).all()
            lefts, rights, counts = (np.array(column) for column in zip(*buckets, strict=True))
            assert counts.sum() == len(keys) == 100
            assert lefts[0] == pytest.approx(values.min(), rel=1e-12, abs=1e-300)
            assert rights[-1] == pytest.approx(values.max(), rel=1e-12, abs=1e-300)
            # each bucket [left, right) (the last one closed) counts the values inside it
            inside = np.searchsorted(rights[:-1], values, side="right")
            assert counts.tolist() == np.bincount(inside, minlength=len(counts)).tolist(), step


# Drawing 100 rows takes about 0.1 s a statistic, an epoch of this fit milliseconds: within the
# heat-maps' share of the time only the first epoch's end and the end of training draw.
DRAWN_STEPS = [STEPS_PER_EPOCH, STEPS_PER_EPOCH * EPOCHS]


def test_heatmap_images_at_the_first_epoch_end_and_the_last(deep_run):
    url = deep_run["tensorboard"]
    tags = {f"optimizer/{s}/heatmap" for s in DEFAULT_STATISTICS}
    images = tb_poll(url, "/data/plugin/images/tags", lambda t: tags <= set(t.get(RUN, {})))
    assert {tag: images[RUN][tag]["samples"] for tag in tags} == dict.fromkeys(tags, 1)
    query = urllib.parse.urlencode({"run": RUN, "tag": "optimizer/grad_norm/heatmap", "sample": 0})
    series = servers.get_json(f"{url}/data/plugin/images/images?{query}")
    assert [entry["step"] for entry in series] == DRAWN_STEPS
    status, png = servers.http_get(
        f"{url}/data/plugin/images/individualImage?{series[-1]['query']}"
    )
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert height >= 10 * len(deep_run["keys"]), (width, height)  # >= 10 pixels a row


def test_recorder_gets_the_views_at_each_read(deep_run):
    recorder = deep_run["recorder"]
    tags = {f"optimizer/{s}/across_variables" for s in DEFAULT_STATISTICS}
    assert [(set(h), s) for h, s in recorder.histograms] == [(tags, s) for s in READ_STEPS]
    assert sorted(recorder.figures, key=lambda f: f[1]) == [
        (f"optimizer/{s}/heatmap", end) for end in DRAWN_STEPS for s in DEFAULT_STATISTICS
    ]


def test_custom_scalar_layout_has_no_chart_of_100_lines(deep_run):
    layout = tb_poll(
        deep_run["tensorboard"], "/data/plugin/custom_scalars/layout", lambda j: j.get("category")
    )
    charts = {c["title"]: c["multiline"]["tag"] for g in layout["category"] for c in g["chart"]}
    assert set(charts) == {"learning_rate", "global_grad_norm", "global_update_norm"}


def test_mlflow_keeps_one_heatmap_per_statistic(deep_run):
    client, run_id = deep_run["mlflow"], deep_run["run_id"]
    names = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert names == {f"figures/optimizer_{s}_heatmap.png" for s in DEFAULT_STATISTICS}
    local = client.download_artifacts(run_id, "figures/optimizer_grad_norm_heatmap.png")
    with open(local, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
    # per-variable metrics are still there, for comparisons across runs
    metrics = client.get_run(run_id).data.metrics
    assert {f"optimizer/grad_norm/{key}" for key in deep_run["keys"]} <= set(metrics)


# --------------------------------------------------------------------------- without servers
def fit_small(compact):
    recorder = FigureRecorder()
    model = make_model(InstrumentedAdam(learning_rate=0.01))
    x, y = make_data()
    logger = OptimizerStatsLogger(sinks=[recorder], interval=4, compact=compact)
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0, callbacks=[logger])
    return recorder


def test_small_model_gets_no_views_by_default():
    recorder = fit_small("auto")
    assert recorder.histograms == [] and recorder.figures == []
    assert "grad_norm" in recorder.layouts[0]


def test_compact_true_gives_views_to_a_small_model(monkeypatch):
    monkeypatch.setattr(publishing, "HEATMAP_SHARE", math.inf)  # no time limit: every epoch end
    recorder = fit_small(True)
    assert recorder.histograms and all(
        len(values) == 4 for histograms, _ in recorder.histograms for values in histograms.values()
    )
    assert {name for name, _ in recorder.figures} == {
        f"optimizer/{s}/heatmap" for s in DEFAULT_STATISTICS
    }
    x, _ = make_data()
    epoch_ends = [math.ceil(len(x) / 32) * epoch for epoch in (1, 2)]
    assert sorted({step for _, step in recorder.figures}) == epoch_ends
    assert "grad_norm" in recorder.layouts[0]  # 4 lines a chart stay in the layout


@pytest.mark.parametrize("compact", ["always", None, 1, "True"])
def test_logger_rejects_bad_compact(compact):
    with pytest.raises(ValueError, match=r"Argument `compact` must be one of .*compact="):
        OptimizerStatsLogger(sinks=[RecordingSink()], compact=compact)


def drawn_cells(png, groups, steps):
    """The RGB pixel at the centre of every cell of a heat-map image, groups x reads x 3."""
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    centres = [
        [cell_centre(groups, steps, r, i) for i in range(len(steps))] for r in range(len(groups))
    ]
    return image, np.array([[image[y, x] for x, y in row] for row in centres])


def viridis(values, norm):
    return np.round(colormaps["viridis"](norm(values))[..., :3] * 255)


def test_heatmap_draws_the_values_it_is_given():
    groups = [f"dense_{i:02d}/{part}" for i in range(50) for part in ("kernel", "bias")]
    steps = [3, 6, 8]
    rng = np.random.default_rng(0)
    values = 10.0 ** rng.uniform(-6, 0, size=(len(groups), len(steps)))
    values[5, 1] = 0.0  # not shown on a log scale
    values[7, 2] = math.nan
    png = heatmap("grad_norm", groups, steps, values)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image, cells = drawn_cells(png, groups, steps)
    assert image.shape[0] >= 10 * len(groups)  # >= 10 pixels a row
    # six decades: matplotlib's viridis on a log scale from the smallest positive value
    norm = colors.LogNorm(vmin=values[values > 0].min(), vmax=np.nanmax(values))
    expected = viridis(values, norm)
    expected[5, 1] = expected[7, 2] = (211, 211, 211)  # grey
    np.testing.assert_allclose(cells, expected, atol=1)


def test_heatmap_of_a_fraction_is_linear():
    values = np.array([[0.0, 0.5], [0.25, 1.0]])
    groups, steps = ["a/kernel", "a/bias"], [1, 2]
    _, cells = drawn_cells(heatmap("zero_grad_fraction", groups, steps, values), groups, steps)
    np.testing.assert_allclose(cells, viridis(values, colors.Normalize(0.0, 1.0)), atol=1)


def test_views_keep_each_statistic_per_group_and_read():
    def read(step, means):
        keys = list(means)
        mean = np.array(list(means.values()))
        return Statistics(step, 1, keys, mean, mean, mean, mean, np.full(len(keys), -1.0))

    views = CompactViews()
    first = views.add(
        read(
            5, {("grad_norm", "a"): 1.0, ("grad_norm", "b"): math.nan, ("learning_rate", None): 0.1}
        )
    )
    views.add(read(9, {("grad_norm", "a"): 2.0, ("grad_norm", "b"): 3.0}))
    assert list(first) == ["optimizer/grad_norm/across_variables"]
    np.testing.assert_array_equal(first["optimizer/grad_norm/across_variables"], [1.0])
    groups, steps, values = views.matrix("grad_norm")
    assert (groups, steps) == (["a", "b"], [5, 9])
    np.testing.assert_array_equal(values, [[1.0, 2.0], [math.nan, 3.0]])
    assert list(views.heatmaps()) == ["optimizer/grad_norm/heatmap"]
