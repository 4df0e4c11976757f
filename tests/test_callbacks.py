"""`OptimizerStatsLogger`: what it reads, when, under which tags, what it puts
into Keras' `logs`, and how it ends runs (FINISHED / FAILED / KILLED) and survives failing sinks.

A linear model trained with plain gradient descent has a closed-form gradient, so every logged
value is recomputed in NumPy from the data alone: the whole weight trajectory is simulated in
float64 and the statistics of each logging window are averaged from it.
"""

import copy
import csv
import math
import re
import subprocess
import sys
import textwrap
import threading
import warnings

import keras
import numpy as np
import pytest
import servers
from backends import BACKEND

from optiscope.callbacks import DivergenceGuard, OptimizerStatsLogger
from optiscope.optimizers import (
    DEFAULT_STATISTICS,
    STATISTICS,
    InstrumentedAdam,
    InstrumentedSGD,
    SignAveraging,
    variable_keys,
)
from optiscope.tracking import Sink

FEATURES = 3
SAMPLES = 48
BATCH = 4
STEPS_PER_EPOCH = SAMPLES // BATCH  # 12
EPOCHS = 2
STEPS = STEPS_PER_EPOCH * EPOCHS  # 24
LR = 0.1
EPS = 1e-12  # the statistics' epsilon
AGGREGATE_KEYS = (
    "opt_learning_rate",
    "opt_global_grad_norm",
    "opt_global_update_norm",
    "opt_effective_lr",
    "opt_sign_flip_fraction",
    "opt_sign_agreement",
)


# --------------------------------------------------------------------------- recording sink
class RecordingSink(Sink):
    """Keeps a deep copy of every call, in order (calls may come from Keras' callback threads)."""

    def __init__(self):
        self.calls = []
        self._lock = threading.Lock()

    def _record(self, method, *args):
        with self._lock:
            self.calls.append((method, copy.deepcopy(args)))

    def log_params(self, params):
        self._record("log_params", params)

    def log_metrics(self, metrics, step):
        self._record("log_metrics", metrics, step)

    def log_histograms(self, histograms, step):
        self._record("log_histograms", histograms, step)

    def log_figure(self, name, figure, step):
        self._record("log_figure", name, step)

    def log_artifact(self, path, artifact_path=None):
        self._record("log_artifact", path, artifact_path)

    def log_layout(self, charts, category="optimizer"):
        self._record("log_layout", charts)

    def log_hparams(self, hparams, metrics):
        self._record("log_hparams", hparams, metrics)

    def log_event(self, message, step):
        self._record("log_event", message, step)

    def flush(self):
        self._record("flush")

    def close(self, status="FINISHED"):
        self._record("close", status)

    # ---- views
    def of(self, method):
        return [args for name, args in self.calls if name == method]

    def statistics_records(self):
        """`[(step, {tag: value})]` of the optimizer statistics (tags `optimizer/...`)."""
        records = []
        for metrics, step in self.of("log_metrics"):
            if any(tag.startswith("optimizer/") for tag in metrics):
                assert all(tag.startswith("optimizer/") for tag in metrics), metrics
                records.append((step, metrics))
        return records

    def epoch_records(self):
        """`[(epoch, logs)]` of the Keras logs forwarded at each epoch's end (as `epoch/<key>`)."""
        return [
            (step, {tag.removeprefix("epoch/"): value for tag, value in metrics.items()})
            for metrics, step in self.of("log_metrics")
            if all(tag.startswith("epoch/") for tag in metrics)
        ]

    def statuses(self):
        return [args[0] for args in self.of("close")]


class FailingSink(Sink):
    """Raises in every method."""

    def _fail(self, *args, **kwargs):
        raise ConnectionError("back end unreachable")

    log_params = log_metrics = log_histograms = log_figure = log_artifact = _fail
    log_layout = log_hparams = log_event = flush = close = _fail


# --------------------------------------------------------------------------- model and data
def make_data():
    rng = np.random.default_rng(0)
    x = (0.5 * rng.normal(size=(SAMPLES, FEATURES))).astype("float32")
    y = x @ np.array([[0.5], [-1.0], [0.25]]) + 0.1 * rng.normal(size=(SAMPLES, 1))
    return x, y.astype("float32")


INITIAL = [np.array([[0.3], [0.2], [-0.1]], "float32"), np.array([0.05], "float32")]


def make_model(optimizer, **compile_options):
    """`Dense(1)` named "dense": its variables are the statistics' groups."""
    inputs = keras.Input((FEATURES,))
    model = keras.Model(inputs, keras.layers.Dense(1, name="dense")(inputs), name="linear")
    model.set_weights(INITIAL)
    compile_options.setdefault("jit_compile", False)
    model.compile(optimizer=optimizer, loss="mse", **compile_options)
    return model


def fit(model, callbacks, epochs=EPOCHS, **options):
    x, y = make_data()
    return model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
        **options,
    )


def keys_of(model):
    return variable_keys(model.trainable_variables)  # ["dense/kernel", "dense/bias"]


class DirectReads(keras.callbacks.Callback):
    """Reads `optimizer.statistics(reset=False)` after every batch, keyed by the optimizer's step.

    Placed before the logger, each read covers the same window as the logger's read at that
    step (the window since the logger's previous read). Having batch hooks and no `async_safe`,
    it also makes Keras dispatch batch hooks synchronously, so reads happen at the batch ends.
    """

    def __init__(self):
        super().__init__()
        self.reads = {}

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        statistics = optimizer.statistics(reset=False)
        self.reads[statistics.step] = statistics


# --------------------------------------------------------------------------- NumPy reference
def simulate_sgd(steps=STEPS, lr=LR):
    """Per step of `SGD(lr)` on the MSE of the linear model, in float64: per-variable statistics
    (keys "dense/kernel", "dense/bias") and the global ones, as `{tag suffix: value}`."""
    x, y = make_data()
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    kernel, bias = (w.astype(np.float64) for w in INITIAL)
    records = []
    for t in range(steps):
        rows = slice((t % STEPS_PER_EPOCH) * BATCH, (t % STEPS_PER_EPOCH + 1) * BATCH)
        residual = x[rows] @ kernel + bias - y[rows]
        grads = [2.0 * x[rows].T @ residual / BATCH, 2.0 * residual.sum(axis=0) / BATCH]
        old = [kernel, bias]
        kernel, bias = kernel - lr * grads[0], bias - lr * grads[1]
        new = [kernel, bias]
        record = {"learning_rate": lr}
        grad_sq = update_sq = 0.0
        for key, g, w_old, w_new in zip(
            ("dense/kernel", "dense/bias"), grads, old, new, strict=True
        ):
            g_norm = np.linalg.norm(g)
            u_norm = np.linalg.norm(w_new - w_old)
            w_norm = np.linalg.norm(w_new)
            record[f"grad_norm/{key}"] = g_norm
            record[f"update_norm/{key}"] = u_norm
            record[f"weight_norm/{key}"] = w_norm
            record[f"effective_lr/{key}"] = u_norm / (g_norm + EPS)
            record[f"update_ratio/{key}"] = u_norm / (w_norm + EPS)
            grad_sq += g_norm**2
            update_sq += u_norm**2
        record["global_grad_norm"] = math.sqrt(grad_sq)
        record["global_update_norm"] = math.sqrt(update_sq)
        records.append(record)
    return records


def check_windows(records, reference, fields=("mean",), rtol=1e-4, atol=1e-7):
    """Each record at step s holds, for every statistic, the field over the steps since the
    previous record (its window). The tolerance allows for float32 weights: an update is the
    difference of two float32 values, relatively less precise than the values."""
    previous = 0
    for step, metrics in records:
        window = reference[previous:step]
        assert window, f"record at step {step} after step {previous}: empty window"
        for name, _ in window[0].items():
            values = np.array([r[name] for r in window])
            expected = {"mean": values.mean(), "last": values[-1], "max": values.max()}
            for field in fields:
                suffix = "" if field == "mean" else f"_{field}"
                head, _, group = name.partition("/")
                tag = f"optimizer/{head}{suffix}" + (f"/{group}" if group else "")
                np.testing.assert_allclose(
                    metrics[tag],
                    expected[field],
                    rtol=rtol,
                    atol=atol,
                    err_msg=f"{tag} at step {step} (window {previous + 1}..{step})",
                )
        previous = step
    assert previous == len(reference), "the last record must end at the last step"


def expected_tags(keys, statistics=DEFAULT_STATISTICS, fields=("mean",)):
    tags = set()
    for name in statistics:
        for key in keys:
            for field in fields:
                suffix = "" if field == "mean" else f"_{field}"
                tags.add(f"optimizer/{name}{suffix}/{key}")
            if STATISTICS[name].cumulative:
                tags.add(f"optimizer/{name}_total/{key}")
    for name in ("learning_rate", "global_grad_norm", "global_update_norm"):
        for field in fields:
            suffix = "" if field == "mean" else f"_{field}"
            tags.add(f"optimizer/{name}{suffix}")
    return tags


# --------------------------------------------------------------------------- when it reads
def test_reads_every_interval_steps_and_at_epoch_ends():
    """interval=5, 12 steps per epoch: at the multiples of 5 and at each epoch's end."""
    sink = RecordingSink()
    model = make_model(InstrumentedSGD(LR))
    fit(model, [DirectReads(), OptimizerStatsLogger(close_sinks=True, sinks=sink, interval=5)])
    steps = [step for step, _ in sink.statistics_records()]
    assert steps == [5, 10, 12, 15, 20, 24]


def test_interval_dividing_the_epoch_reads_once_per_step():
    """interval=4: 4, 8, 12 (the epoch-end read finds no new step and logs nothing), ..."""
    sink = RecordingSink()
    model = make_model(InstrumentedSGD(LR))
    fit(model, [DirectReads(), OptimizerStatsLogger(close_sinks=True, sinks=sink, interval=4)])
    assert [step for step, _ in sink.statistics_records()] == [4, 8, 12, 16, 20, 24]


# --------------------------------------------------------------------------- what it reads
def test_logged_values_are_window_statistics():
    """Tags per variable key, every field recomputed in NumPy over its window, and equal to a
    direct `optimizer.statistics()` read of the same window; cumulative statistics get totals."""
    sink = RecordingSink()
    direct = DirectReads()
    model = make_model(InstrumentedSGD(LR))
    fields = ("mean", "last", "max")
    fit(
        model,
        [
            direct,
            OptimizerStatsLogger(
                close_sinks=True, sinks=sink, interval=5, every_step=True, fields=fields
            ),
        ],
    )
    keys = keys_of(model)
    assert keys == ["dense/kernel", "dense/bias"]
    records = sink.statistics_records()
    assert len(records) >= 4
    for step, metrics in records:
        assert set(metrics) == expected_tags(keys, fields=fields), step
        assert all(isinstance(v, float) for v in metrics.values())

    check_windows(records, simulate_sgd(), fields=fields)

    # The same numbers as a direct read of the same window.
    for step, metrics in records:
        statistics = direct.reads[step]
        for (name, group), summary in statistics.items():
            tag = f"optimizer/{name}" + (f"/{group}" if group else "")
            assert metrics[tag] == summary.mean, (tag, step)
            if STATISTICS.get(name) is not None and STATISTICS[name].cumulative:
                total = f"optimizer/{name}_total/{group}"
                assert metrics[total] == summary.total, (total, step)


def check_values_at_steps(records, reference, fields=("mean",), rtol=1e-4, atol=1e-7):
    """Each record at step s holds every statistic's value at step s (its one measured step)."""
    for step, metrics in records:
        for name, value in reference[step - 1].items():
            head, _, group = name.partition("/")
            for field in fields:
                suffix = "" if field == "mean" else f"_{field}"
                tag = f"optimizer/{head}{suffix}" + (f"/{group}" if group else "")
                np.testing.assert_allclose(
                    metrics[tag], value, rtol=rtol, atol=atol, err_msg=f"{tag} at step {step}"
                )


def test_by_default_only_the_logged_steps_are_measured():
    """interval=5, 12 steps an epoch: the optimizer measures steps 5, 10, 12, 15, 20 and 24,
    each point is its step's exact value in every field, and once training ends (the logger's
    schedule withdrawn) the optimizer measures every step again."""
    sink = RecordingSink()
    model = make_model(InstrumentedSGD(LR))
    fields = ("mean", "last", "max")
    fit(model, [OptimizerStatsLogger(close_sinks=True, sinks=sink, interval=5, fields=fields)])
    records = sink.statistics_records()
    assert [step for step, _ in records] == [5, 10, 12, 15, 20, 24]
    for step, metrics in records:
        assert set(metrics) == expected_tags(keys_of(model), fields=fields), step
    check_values_at_steps(records, simulate_sgd(), fields=fields)

    fit(model, [], epochs=1)
    statistics = model.optimizer.statistics()
    assert statistics.steps == STEPS_PER_EPOCH
    assert statistics.step == STEPS + STEPS_PER_EPOCH


def test_by_default_a_read_after_its_step_shows_that_step():
    """Batch hooks run once per execution of 4 steps: with interval=6 the read at step 8 finds
    step 6 measured, and labels the point with it."""
    sink = RecordingSink()
    model = make_model(InstrumentedSGD(LR), steps_per_execution=4)
    fit(model, [OptimizerStatsLogger(close_sinks=True, sinks=sink, interval=6)])
    records = sink.statistics_records()
    assert [step for step, _ in records] == [6, 12, 18, 24]
    check_values_at_steps(records, simulate_sgd())


def test_cumulative_totals_sum_the_windows():
    """SignAveraging's `sign_flip_count` is cumulative: at every read its `_total` equals the sum
    of the per-step counts so far, i.e. the sum of window means times window lengths."""
    sink = RecordingSink()
    model = make_model(SignAveraging(learning_rate=0.4))
    fit(
        model,
        [
            DirectReads(),
            OptimizerStatsLogger(close_sinks=True, sinks=sink, interval=3, every_step=True),
        ],
    )
    records = sink.statistics_records()
    keys = keys_of(model)
    tags = expected_tags(keys, (*DEFAULT_STATISTICS, "sign_flip_fraction", "sign_flip_count"))
    sizes = {"dense/kernel": FEATURES, "dense/bias": 1}
    running = dict.fromkeys(keys, 0.0)
    previous = 0
    flipped = False
    for step, metrics in records:
        assert set(metrics) == tags
        for key in keys:
            count = metrics[f"optimizer/sign_flip_count/{key}"]
            fraction = metrics[f"optimizer/sign_flip_fraction/{key}"]
            assert count == pytest.approx(fraction * sizes[key], rel=1e-6, abs=1e-9)
            running[key] += count * (step - previous)
            assert metrics[f"optimizer/sign_flip_count_total/{key}"] == pytest.approx(
                running[key], rel=1e-9, abs=1e-9
            )
            flipped |= count > 0
        previous = step
    assert previous == STEPS
    assert flipped, "the premise: some gradient changes sign at this learning rate"


def test_layout_groups_each_statistic():
    sink = RecordingSink()
    model = make_model(InstrumentedSGD(LR))
    fit(model, [DirectReads(), OptimizerStatsLogger(close_sinks=True, sinks=sink, interval=6)])
    layouts = sink.of("log_layout")
    assert len(layouts) == 1
    (charts,) = layouts[0]
    keys = keys_of(model)
    tags = expected_tags(keys)

    def drawn_by(title):
        return [t for t in tags if any(re.match(p, t) for p in charts[title])]

    for tag in tags:
        assert sum(tag in drawn_by(title) for title in charts) == 1, f"{tag} in one chart"
    for name in DEFAULT_STATISTICS:
        assert sorted(drawn_by(name)) == sorted(f"optimizer/{name}/{key}" for key in keys)
        # the same chart draws another model's variables too (runs share one layout)
        assert any(re.match(p, f"optimizer/{name}/conv/kernel") for p in charts[name])
    for name in ("learning_rate", "global_grad_norm", "global_update_norm"):
        assert drawn_by(name) == [f"optimizer/{name}"]
        assert not any(re.match(p, f"optimizer/{name}_total") for p in charts[name])
    # The layout is written before the first metrics.
    methods = [name for name, _ in sink.calls]
    assert methods.index("log_layout") < methods.index("log_metrics")


def test_params_are_logged_when_training_begins():
    sink = RecordingSink()
    model = make_model(InstrumentedSGD(LR))
    logger = OptimizerStatsLogger(
        close_sinks=True, sinks=sink, interval=6, params={"data.description": "toy"}
    )
    fit(model, [logger])
    (params,) = sink.of("log_params")[0]
    assert params["optimizer.class"] == "SGD"  # the class a user would type
    assert params["optimizer.learning_rate"] == pytest.approx(LR)
    assert params["model.trainable_parameters"] == FEATURES + 1
    assert params["data.description"] == "toy"  # the user's own parameters


def test_steps_per_execution():
    """Batch hooks run once per execution of 4 steps: the logger reads at most once per
    execution, and labels each read with the optimizer's step."""
    sink = RecordingSink()
    model = make_model(InstrumentedSGD(LR), steps_per_execution=4)
    fit(
        model,
        [
            DirectReads(),
            OptimizerStatsLogger(close_sinks=True, sinks=sink, interval=6, every_step=True),
        ],
    )
    records = sink.statistics_records()
    assert [step for step, _ in records] == [8, 12, 20, 24]
    check_windows(records, simulate_sgd())

    sink = RecordingSink()
    model = make_model(InstrumentedSGD(LR), steps_per_execution=4)
    fit(
        model,
        [
            DirectReads(),
            OptimizerStatsLogger(close_sinks=True, sinks=sink, interval=1, every_step=True),
        ],
    )
    records = sink.statistics_records()
    assert [step for step, _ in records] == [4, 8, 12, 16, 20, 24]
    check_windows(records, simulate_sgd())


def test_jit_compile():
    sink = RecordingSink()
    model = make_model(InstrumentedSGD(LR), jit_compile=True)
    fit(
        model,
        [
            DirectReads(),
            OptimizerStatsLogger(close_sinks=True, sinks=sink, interval=5, every_step=True),
        ],
    )
    records = sink.statistics_records()
    assert {step for step, _ in records} >= {5, 10, 12, 24}
    check_windows(records, simulate_sgd())


def test_loss_scale_optimizer(mixed_float16):
    """Under mixed precision the model's optimizer is a LossScaleOptimizer: the logger reads the
    instrumented optimizer inside it, and the statistics are those of the unscaled gradient."""
    sink = RecordingSink()
    optimizer = InstrumentedSGD(LR)
    model = make_model(optimizer)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    fit(
        model,
        [
            DirectReads(),
            OptimizerStatsLogger(close_sinks=True, sinks=sink, interval=4, every_step=True),
        ],
    )
    assert int(optimizer.iterations) == STEPS  # premise: no step skipped for an overflow
    records = sink.statistics_records()
    assert [step for step, _ in records] == [4, 8, 12, 16, 20, 24]
    assert set(records[0][1]) == expected_tags(keys_of(model))
    # The float16 forward pass perturbs gradients by about 1e-3; the bias stays near zero, so its
    # update ratio (update / weight norm) amplifies that to a few percent. A scaled gradient
    # would be off by the loss scale (2**15), far outside this tolerance.
    check_windows(records, simulate_sgd(), rtol=5e-2, atol=1e-4)


def test_async_dispatch_reads_whole_windows():
    """Alone (with History), the logger is dispatched on Keras' callback threads: reads may land
    after their batch, but each is labelled with its own step and covers whole steps since the
    previous read; nothing is logged twice and the last read ends at the last step."""
    sink = RecordingSink()
    model = make_model(InstrumentedSGD(LR))
    fit(
        model,
        [OptimizerStatsLogger(close_sinks=True, sinks=sink, interval=1, every_step=True)],
        epochs=3,
    )
    records = sink.statistics_records()
    steps = [step for step, _ in records]
    assert steps == sorted(set(steps))
    assert {STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH} <= set(steps)
    check_windows(records, simulate_sgd(steps=3 * STEPS_PER_EPOCH))


# --------------------------------------------------------------------------- epoch aggregates
def per_step_values(make_optimizer, names):
    """Per-step values of global statistics, from a run that reads after every step."""
    sink = RecordingSink()
    model = make_model(make_optimizer())
    fit(model, [DirectReads(), OptimizerStatsLogger(close_sinks=True, sinks=sink, interval=1)])
    records = sink.statistics_records()
    assert [step for step, _ in records] == list(range(1, STEPS + 1))
    return {name: np.array([m[f"optimizer/{name}"] for _, m in records]) for name in names}


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_epoch_aggregates_in_history_and_csv(tmp_path):
    sink = RecordingSink()
    model = make_model(InstrumentedSGD(LR))
    csv_path = tmp_path / "log.csv"
    history = fit(
        model,
        [
            OptimizerStatsLogger(close_sinks=True, sinks=sink, interval=5, every_step=True),
            keras.callbacks.CSVLogger(str(csv_path)),
        ],
    )
    # Plain SGD has neither sign statistic: those keys are left out.
    present = [
        k for k in AGGREGATE_KEYS if k not in ("opt_sign_flip_fraction", "opt_sign_agreement")
    ]
    for key in present:
        assert len(history.history[key]) == EPOCHS, key
    assert "opt_sign_flip_fraction" not in history.history
    assert "opt_sign_agreement" not in history.history
    rows = read_csv(csv_path)
    assert len(rows) == EPOCHS
    for row in rows:
        assert set(present) <= set(row)
        assert "opt_sign_agreement" not in row

    per_step = per_step_values(
        lambda: InstrumentedSGD(LR), ("global_grad_norm", "global_update_norm")
    )
    reference = simulate_sgd()
    for epoch in range(EPOCHS):
        steps = slice(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH)
        expected = {
            "opt_learning_rate": LR,
            "opt_global_grad_norm": per_step["global_grad_norm"][steps].mean(),
            "opt_global_update_norm": per_step["global_update_norm"][steps].mean(),
            "opt_effective_lr": LR,  # plain gradient descent: update = lr * gradient
        }
        numpy_grad_norm = np.mean([r["global_grad_norm"] for r in reference[steps]])
        assert expected["opt_global_grad_norm"] == pytest.approx(numpy_grad_norm, rel=2e-5)
        for source, values in (
            ("History", {k: v[epoch] for k, v in history.history.items()}),
            ("CSVLogger", {k: float(v) for k, v in rows[epoch].items() if v != "NA"}),
        ):
            for key, value in expected.items():
                assert values[key] == pytest.approx(value, rel=1e-6), (source, key, epoch)
        # The sinks get the same epoch logs.
        step, logs = sink.epoch_records()[epoch]
        assert step == epoch + 1
        assert logs["opt_global_grad_norm"] == history.history["opt_global_grad_norm"][epoch]


@pytest.mark.parametrize(
    ("make_optimizer", "statistic", "missing"),
    [
        (lambda: SignAveraging(learning_rate=0.4), "sign_flip_fraction", "opt_sign_agreement"),
        (
            lambda: InstrumentedAdam(0.05, statistics=["default", "sign_agreement"]),
            "sign_agreement",
            "opt_sign_flip_fraction",
        ),
    ],
    ids=["sign_averaging", "adam"],
)
def test_epoch_aggregates_of_sign_statistics(make_optimizer, statistic, missing):
    """The sign statistics' aggregate is the epoch's mean over its groups, step-weighted."""
    model = make_model(make_optimizer())
    history = fit(
        model,
        [
            OptimizerStatsLogger(
                close_sinks=True, sinks=RecordingSink(), interval=5, every_step=True
            )
        ],
    )
    keys = keys_of(model)
    per_step = per_step_values(make_optimizer, [f"{statistic}/{key}" for key in keys])
    for epoch in range(EPOCHS):
        steps = slice(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH)
        expected = np.mean([per_step[f"{statistic}/{key}"][steps].mean() for key in keys])
        assert history.history[f"opt_{statistic}"][epoch] == pytest.approx(expected, abs=1e-9)
    assert missing not in history.history
    assert set(AGGREGATE_KEYS) - {missing} <= set(history.history)


def test_uninstrumented_optimizer_is_refused():
    model = make_model(keras.optimizers.Adam(0.01))
    with pytest.raises(ValueError, match="Adam"):
        fit(model, [OptimizerStatsLogger(close_sinks=True, sinks=RecordingSink())])


@pytest.mark.skipif(BACKEND == "tensorflow", reason="tf.distribute is TensorFlow's own")
@pytest.mark.parametrize("callback", [OptimizerStatsLogger, DivergenceGuard])
def test_tf_distribute_strategy_is_refused_on_other_backends(callback):
    tf = pytest.importorskip("tensorflow")
    model = make_model(InstrumentedSGD(LR))
    logger_only = {"close_sinks": True, "sinks": RecordingSink()}
    kwargs = logger_only if callback is OptimizerStatsLogger else {}
    with (
        tf.distribute.OneDeviceStrategy("/cpu:0").scope(),
        pytest.raises(RuntimeError) as raised,
    ):
        fit(model, [callback(**kwargs)])
    message = str(raised.value)
    assert f"the Keras backend is {BACKEND!r}" in message
    assert "only on the TensorFlow backend" in message
    assert "KERAS_BACKEND=tensorflow" in message


# --------------------------------------------------------------------------- run status
class RaiseAt(keras.callbacks.Callback):
    def __init__(self, batch, error):
        super().__init__()
        self.batch = batch
        self.error = error

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            raise self.error


@pytest.mark.parametrize(
    ("error", "status"),
    [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")],
    ids=["exception", "ctrl_c"],
)
def test_context_manager_closes_interrupted_run(error, status):
    sink = RecordingSink()
    model = make_model(InstrumentedSGD(LR))
    with (
        pytest.raises(type(error)),
        OptimizerStatsLogger(close_sinks=True, sinks=sink, interval=2) as logger,
    ):
        fit(model, [logger, RaiseAt(3, error)])
    assert sink.statuses() == [status]
    assert sink.of("log_hparams") == []  # on_train_end never ran
    assert [step for step, _ in sink.statistics_records()] == [2, 4]


def test_finished_run():
    sink = RecordingSink()
    model = make_model(InstrumentedSGD(LR))
    with OptimizerStatsLogger(close_sinks=True, sinks=sink, interval=6) as logger:
        fit(model, [logger])
    assert sink.statuses() == ["FINISHED"]  # once: closing is idempotent
    assert sink.calls[-1] == ("close", ("FINISHED",))
    assert len(sink.of("log_hparams")) == 1


SCRIPT = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras
import numpy as np
from optiscope.callbacks import OptimizerStatsLogger
from optiscope.optimizers import InstrumentedSGD
from optiscope.tracking import Sink

STATUS_FILE, MODE = sys.argv[1], sys.argv[2]


class StatusSink(Sink):
    def log_metrics(self, metrics, step):
        with open(STATUS_FILE, "a") as handle:
            handle.write(f"metrics {{step}}\\n")

    def close(self, status="FINISHED"):
        with open(STATUS_FILE, "a") as handle:
            handle.write(f"close {{status}}\\n")


class Interrupt(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 3:
            if MODE == "exception":
                raise RuntimeError("boom in training")
            if MODE == "ctrl_c":
                raise KeyboardInterrupt
            if MODE == "sigint":  # delivered to this thread
                import signal
                signal.raise_signal(signal.SIGINT)


inputs = keras.Input(({features},))
model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
model.compile(InstrumentedSGD(0.1), loss="mse", jit_compile=False)
x = np.ones((32, {features}), "float32")
y = np.zeros((32, 1), "float32")
model.fit(
    x, y, batch_size=4, epochs=2, verbose=0,
    callbacks=[OptimizerStatsLogger(close_sinks=True, sinks=StatusSink(), interval=2), Interrupt()],
)
print("fit returned")
"""


@pytest.mark.parametrize(
    ("mode", "status"),
    [("exception", "FAILED"), ("ctrl_c", "KILLED"), ("sigint", "KILLED")],
)
def test_uncaught_interruption_closes_run_in_process_exit(tmp_path, mode, status):
    """No context manager: the excepthook/atexit path ends the run with the right status."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(features=FEATURES)))
    status_file = tmp_path / "status.txt"
    result = subprocess.run(
        [sys.executable, str(script), str(status_file), mode],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=servers.default_sigint,
    )
    assert result.returncode != 0, result.stdout + result.stderr[-3000:]
    assert "fit returned" not in result.stdout
    lines = status_file.read_text().splitlines()
    assert lines[:2] == ["metrics 2", "metrics 4"], result.stderr[-2000:]
    assert lines[2:] == [f"close {status}"], result.stderr[-2000:]
    expected_error = (
        "RuntimeError: boom in training" if mode == "exception" else "KeyboardInterrupt"
    )
    assert expected_error in result.stderr  # the previous excepthook still reports it


def test_normal_exit_finishes_run_in_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(features=FEATURES)))
    status_file = tmp_path / "status.txt"
    result = subprocess.run(
        [sys.executable, str(script), str(status_file), "none"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = status_file.read_text().splitlines()
    assert lines[-1] == "close FINISHED"
    assert [line for line in lines if line.startswith("close")] == ["close FINISHED"]


# --------------------------------------------------------------------------- failing sinks
def test_failing_sink_never_stops_training():
    """A sink that raises everywhere: training completes, the other sink gets everything, and
    there is one warning per failing method."""
    healthy, reference = RecordingSink(), RecordingSink()
    model = make_model(InstrumentedSGD(LR))
    logger = OptimizerStatsLogger(
        close_sinks=True, sinks=[FailingSink(), healthy], interval=5, histograms=True
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(model, [DirectReads(), logger])
    assert len(history.history["loss"]) == EPOCHS
    assert int(model.optimizer.iterations) == STEPS

    model = make_model(InstrumentedSGD(LR))
    fit(
        model,
        [
            DirectReads(),
            OptimizerStatsLogger(close_sinks=True, sinks=reference, interval=5, histograms=True),
        ],
    )
    methods = [name for name, _ in healthy.calls]
    assert methods == [name for name, _ in reference.calls]
    assert {"log_params", "log_layout", "log_metrics", "log_histograms", "log_hparams"} <= set(
        methods
    )
    assert healthy.statuses() == ["FINISHED"]
    for (name, args), (_, wanted) in zip(healthy.calls, reference.calls, strict=True):
        if name == "log_metrics":
            assert args[1] == wanted[1]
            np.testing.assert_allclose(
                [args[0][k] for k in sorted(args[0])], [wanted[0][k] for k in sorted(wanted[0])]
            )

    failures = [str(w.message) for w in caught if "FailingSink" in str(w.message)]
    failed_methods = sorted(m.split("FailingSink.")[1].split(" ")[0] for m in failures)
    assert failed_methods == sorted(set(methods)), failures
    for message in failures:
        assert issubclass(
            next(w.category for w in caught if str(w.message) == message), RuntimeWarning
        )
        assert "back end unreachable" in message
