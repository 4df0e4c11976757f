"""The tracking sinks against real servers.

A real `mlflow server` (SQLite store, served artifacts) and a real `tensorboard` run on
127.0.0.1; what `OptimizerStatsLogger` logs during `model.fit` is read back through MLflow's
client and TensorBoard's HTTP JSON API and compared with what the optimizer reported (a
recording sink in the same fit, and an identical fit read by a test-local callback). Outages:
a server killed in the middle of a fit and a server that is down from the start; the spooled
run is replayed with `optiscope replay` into another live server. Bad arguments fail before
training starts. `optiscope ui` starts both UIs and stops them on SIGINT.
"""

import contextlib
import math
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.parse

import keras
import matplotlib
import numpy as np
import pytest
import servers

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from optiscope.callbacks import OptimizerStatsLogger  # noqa: E402
from optiscope.optimizers import (  # noqa: E402
    DEFAULT_STATISTICS,
    InstrumentedAdam,
    SignAveraging,
    variable_keys,
)
from optiscope.tracking import MlflowSink, Sink, TensorBoardSink, flatten, mlflow_key  # noqa: E402
from optiscope.tracking.naming import param_value  # noqa: E402

ROWS, FEATURES, BATCH, EPOCHS, INTERVAL = 256, 4, 32, 3, 5
STEPS_PER_EPOCH = math.ceil(ROWS / BATCH)  # 8
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS  # 24
LR = 0.01
KEYS = ["hidden/kernel", "hidden/bias", "out/kernel", "out/bias"]
GLOBAL = ("learning_rate", "global_grad_norm", "global_update_norm")
OPT_LOG_KEYS = (
    "opt_learning_rate",
    "opt_global_grad_norm",
    "opt_global_update_norm",
    "opt_effective_lr",
    "opt_sign_flip_fraction",
    "opt_sign_agreement",
)
WAIT = 30.0  # seconds any poll of a server may take


# --------------------------------------------------------------------------- model and data
def make_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, FEATURES)).astype("float32")
    y = (x @ rng.normal(size=(FEATURES, 1)) + 0.5).astype("float32")
    return x, y


def make_model(optimizer):
    """Dense(8, relu) -> Dense(1) with fixed names and weights, so two fits are identical."""
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ],
        name="net",
    )
    rng = np.random.default_rng(1)
    model.set_weights(
        [rng.normal(scale=0.5, size=w.shape).astype("float32") for w in model.weights]
    )
    model.compile(optimizer=optimizer, loss="mse")
    return model


def fit(model, callbacks, epochs=EPOCHS):
    x, y = make_data()
    return model.fit(
        x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks
    )


def expected_read_steps(steps_per_epoch=STEPS_PER_EPOCH, epochs=EPOCHS, interval=INTERVAL):
    """The steps at which the logger reads (every `interval` steps and at each epoch's
    end), computed from the schedule alone: multiples of `interval` and the epoch ends."""
    total = steps_per_epoch * epochs
    multiples = set(range(interval, total + 1, interval))
    ends = {steps_per_epoch * (e + 1) for e in range(epochs)}
    return sorted(multiples | ends)


class RecordingSink(Sink):
    """Keeps every call it gets."""

    def __init__(self):
        self.params = {}
        self.metrics = []  # (dict, step) per call
        self.histograms = []
        self.layouts = []
        self.hparams = []
        self.closed = []

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step):
        self.metrics.append((dict(metrics), int(step)))

    def log_histograms(self, histograms, step):
        self.histograms.append((dict(histograms), int(step)))

    def log_layout(self, charts, category="optimizer"):
        self.layouts.append(charts)

    def log_hparams(self, hparams, metrics):
        self.hparams.append((dict(hparams), dict(metrics)))

    def close(self, status="FINISHED"):
        self.closed.append(status)

    def points(self):
        """`{(mlflow key, step, value)}` of every metric, NaN as the string "nan"."""
        return {
            (mlflow_key(tag), step, _comparable(value))
            for metrics, step in self.metrics
            for tag, value in metrics.items()
        }

    def mlflow_points(self):
        """What an `MlflowSink` beside this sink delivers: every metric, and the final
        metrics of `log_hparams` as `final/<name>` at step 1."""
        finals = {
            (mlflow_key(f"final/{name}"), 1, _comparable(value))
            for _, metrics in self.hparams
            for name, value in metrics.items()
        }
        return self.points() | finals

    def history(self, tag):
        return [(step, metrics[tag]) for metrics, step in self.metrics if tag in metrics]


class ReferenceReader(keras.callbacks.Callback):
    """Reads `optimizer.statistics()` after the given steps (a per-batch hook without
    `async_safe`, so Keras calls it synchronously): each statistic's value at that step (the
    logger, by default, measures only the steps it logs and sends their values)."""

    def __init__(self, steps):
        super().__init__()
        self.steps = set(steps)
        self.reads = {}

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step in self.steps:
            stats = self.model.optimizer.statistics()
            assert stats.step == step
            self.reads[step] = {f"optimizer/{k}": v for k, v in stats.scalars("last").items()}


def _comparable(value):
    value = float(value)
    return "nan" if math.isnan(value) else value


def mlflow_points(client, run_id):
    """`{(key, step, value)}` of every metric point of a run."""
    run = client.get_run(run_id)
    return {
        (m.key, m.step, _comparable(m.value))
        for key in run.data.metrics
        for m in client.get_metric_history(run_id, key)
    }


def optiscope_warnings(records):
    return [
        w
        for w in records
        if issubclass(w.category, RuntimeWarning) and "optiscope" in str(w.message)
    ]


def replay_cli(spool, tracking_uri):
    """Runs `optiscope replay SPOOL --tracking-uri URI`; returns the new run's id."""
    result = subprocess.run(
        [servers.executable("optiscope"), "replay", str(spool), "--tracking-uri", tracking_uri],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"into run (\w+)", result.stdout)
    assert match, result.stdout
    return match.group(1)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    with servers.mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="module")
def client(mlflow_url):
    return MlflowClient(mlflow_url)


@pytest.fixture(scope="module")
def mlflow_run(mlflow_url, tmp_path_factory):
    """One fit logged to the server by an `MlflowSink` and to a `RecordingSink`."""
    spool = tmp_path_factory.mktemp("spool")
    sink = MlflowSink(tracking_uri=mlflow_url, experiment_name="t", run_name="r", spool_dir=spool)
    recorder = RecordingSink()
    optimizer = InstrumentedAdam(learning_rate=LR)
    model = make_model(optimizer)
    logger = OptimizerStatsLogger(
        sinks=[sink, recorder], interval=INTERVAL, params={"data": "random"}, close_sinks=True
    )
    history = fit(model, [logger])
    assert sink.spool_path is None, f"undelivered records spooled: {sink.last_error}"
    return {
        "run_id": sink.run_id,
        "recorder": recorder,
        "optimizer": optimizer,
        "model": model,
        "history": history.history,
    }


# --------------------------------------------------------------------------- MLflow
def test_mlflow_run_is_finished_under_its_name(client, mlflow_run):
    run = client.get_run(mlflow_run["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r"
    assert client.get_experiment(run.info.experiment_id).name == "t"


def test_mlflow_params_describe_optimizer_and_model(client, mlflow_run):
    params = client.get_run(mlflow_run["run_id"]).data.params
    optimizer = mlflow_run["optimizer"]
    assert params["optimizer.class"] == "Adam"  # the class a user would type
    config = flatten(optimizer.get_config())
    assert {"learning_rate", "beta_1", "beta_2", "epsilon", "statistics"} <= set(config)
    for key, value in config.items():
        assert params[f"optimizer.{key}"] == param_value(value), key
    assert float(params["optimizer.learning_rate"]) == pytest.approx(LR)
    assert params["model.name"] == "net"
    assert params["model.trainable_parameters"] == str(FEATURES * 8 + 8 + 8 + 1)


def test_mlflow_params_include_user_params(client, mlflow_run):
    """`params={"data": "random"}` describes the data (the model and data description)."""
    params = client.get_run(mlflow_run["run_id"]).data.params
    assert params.get("data") == "random", sorted(params)


def test_mlflow_statistics_are_logged_at_the_read_points(client, mlflow_run):
    history = client.get_metric_history(mlflow_run["run_id"], "optimizer/grad_norm/hidden/kernel")
    steps = [m.step for m in history]
    assert 0 not in steps
    assert sorted(steps) == expected_read_steps()


def test_mlflow_every_statistic_and_variable_is_logged(client, mlflow_run):
    metrics = client.get_run(mlflow_run["run_id"]).data.metrics
    for statistic in DEFAULT_STATISTICS:
        for key in KEYS:
            assert f"optimizer/{statistic}/{key}" in metrics
    for name in GLOBAL:
        assert f"optimizer/{name}" in metrics
    assert variable_keys(mlflow_run["model"].trainable_variables) == KEYS


def test_mlflow_has_exactly_what_the_logger_sent(client, mlflow_run):
    """Every (key, step, value) the logger handed to its sinks is on the server, nothing else."""
    recorded = mlflow_run["recorder"].mlflow_points()
    first_loss = [v for k, step, v in recorded if k == "epoch/loss" and step == 1]
    assert first_loss == [pytest.approx(mlflow_run["history"]["loss"][0])]
    assert any(key == "final/loss" for key, _, _ in recorded)
    assert mlflow_points(client, mlflow_run["run_id"]) == recorded


def test_mlflow_statistics_equal_what_the_optimizer_reports(client, mlflow_run):
    """An identical fit read by a test-local callback at the logged steps gives the same
    values as the logger sent to MLflow."""
    run_id = mlflow_run["run_id"]
    steps = [m.step for m in client.get_metric_history(run_id, "optimizer/learning_rate")]
    reader = ReferenceReader(steps)
    fit(make_model(InstrumentedAdam(learning_rate=LR)), [reader])
    assert sorted(reader.reads) == sorted(steps)
    tags = sorted(reader.reads[steps[0]])
    assert "optimizer/grad_norm/hidden/kernel" in tags
    for tag in tags:
        logged = {m.step: m.value for m in client.get_metric_history(run_id, tag)}
        assert sorted(logged) == sorted(steps), tag
        for step in steps:
            assert logged[step] == pytest.approx(reader.reads[step][tag], rel=1e-5, abs=1e-9), (
                tag,
                step,
            )
    lrs = [m.value for m in client.get_metric_history(run_id, "optimizer/learning_rate")]
    assert lrs == pytest.approx([LR] * len(steps), rel=1e-6)


def test_mlflow_keras_epoch_logs_and_aggregates(client, mlflow_run):
    run_id = mlflow_run["run_id"]
    loss = client.get_metric_history(run_id, "epoch/loss")
    assert sorted(m.step for m in loss) == list(range(1, EPOCHS + 1))
    by_step = {m.step: m.value for m in loss}
    assert [by_step[e + 1] for e in range(EPOCHS)] == pytest.approx(mlflow_run["history"]["loss"])
    for key in OPT_LOG_KEYS:
        points = client.get_metric_history(run_id, f"epoch/{key}")
        if key in ("opt_sign_flip_fraction", "opt_sign_agreement"):  # not measured by default
            assert points == [], key
            continue
        assert sorted(m.step for m in points) == list(range(1, EPOCHS + 1)), key
    lr = client.get_metric_history(run_id, "epoch/opt_learning_rate")
    assert [m.value for m in lr] == pytest.approx([LR] * EPOCHS, rel=1e-6)
    norms = client.get_metric_history(run_id, "epoch/opt_global_grad_norm")
    assert all(m.value > 0 and math.isfinite(m.value) for m in norms)
    # the aggregates also reach Keras' History
    assert mlflow_run["history"]["opt_global_grad_norm"] == pytest.approx(
        [m.value for m in sorted(norms, key=lambda m: m.step)]
    )


def test_mlflow_nested_runs(client, mlflow_url, tmp_path):
    options = dict(tracking_uri=mlflow_url, spool_dir=tmp_path, close_timeout=10)
    parent = MlflowSink(experiment_name="nested", run_name="grid", **options)
    parent.log_params({"grid": "lr"})
    children = [parent.child("c1"), parent.child("c2")]
    for i, child in enumerate(children):
        child.log_params({"learning_rate": 0.1 * (i + 1)})
        for step in (1, 2, 3):
            child.log_metrics({"loss": 1.0 / (step + i)}, step=step)
    parent.log_metrics({"best_loss": 0.25}, step=1)
    with _no_optiscope_warnings():
        for child in children:
            child.close()
        parent.close()
    parent_run = client.get_run(parent.run_id)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.metrics == {"best_loss": 0.25}
    for i, child in enumerate(children):
        run = client.get_run(child.run_id)
        assert run.info.run_name == f"c{i + 1}"
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.run_id
        assert run.info.experiment_id == parent_run.info.experiment_id
        assert [m.value for m in client.get_metric_history(child.run_id, "loss")] == pytest.approx(
            [1.0 / (s + i) for s in (1, 2, 3)]
        )
    found = client.search_runs(
        [parent_run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'"
    )
    assert sorted(r.info.run_name for r in found) == ["c1", "c2"]


def test_mlflow_children_of_a_parent_that_has_not_logged_yet(client, mlflow_url, tmp_path):
    """A comparison's parent may log nothing before its children train: the children still
    nest under it instead of waiting for it and being spooled."""
    options = dict(tracking_uri=mlflow_url, spool_dir=tmp_path, close_timeout=3)
    parent = MlflowSink(experiment_name="nested-late", run_name="grid", **options)
    child = parent.child("only")
    child.log_metrics({"loss": 1.0}, step=1)
    with _no_optiscope_warnings():
        child.close()
        parent.close()
    assert child.spool_path is None
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.metrics == {"loss": 1.0}


def test_mlflow_artifacts_and_figures(client, mlflow_url, tmp_path):
    sink = MlflowSink(
        tracking_uri=mlflow_url, experiment_name="t", run_name="artifacts", spool_dir=tmp_path
    )
    table = tmp_path / "table.csv"
    table.write_text("optimizer,loss\nadam,0.5\n")
    sink.log_artifact(table)
    sink.log_artifact(table, "tables")
    figure, axes = plt.subplots()
    axes.plot([0, 1, 2], [2, 1, 0.5])
    sink.log_figure("curves/loss", figure, step=3)
    plt.close(figure)
    sink.close()
    assert sink.spool_path is None
    top = {a.path for a in client.list_artifacts(sink.run_id)}
    assert {"table.csv", "tables", "figures"} <= top
    assert [a.path for a in client.list_artifacts(sink.run_id, "tables")] == ["tables/table.csv"]
    figures = client.list_artifacts(sink.run_id, "figures")
    assert [a.path for a in figures] == ["figures/curves_loss.png"]
    assert figures[0].file_size > 100
    local = client.download_artifacts(sink.run_id, "figures/curves_loss.png", str(tmp_path))
    with open(local, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
    local = client.download_artifacts(sink.run_id, "table.csv", str(tmp_path / "down"))
    with open(local) as file:
        assert file.read() == table.read_text()


def test_mlflow_large_batches_are_chunked(client, mlflow_url, tmp_path):
    """2500 metrics in one call (MLflow takes ≤ 1000 a request) and 250 params (≤ 100)."""
    sink = MlflowSink(
        tracking_uri=mlflow_url, experiment_name="t", run_name="wide", spool_dir=tmp_path
    )
    sink.log_metrics({f"m{i}": float(i) for i in range(2500)}, step=7)
    sink.log_params({f"p{i}": i for i in range(250)})
    sink.close()
    assert sink.spool_path is None
    run = client.get_run(sink.run_id)
    assert run.data.metrics == {f"m{i}": float(i) for i in range(2500)}
    assert run.data.params == {f"p{i}": str(i) for i in range(250)}
    assert [(m.step, m.value) for m in client.get_metric_history(sink.run_id, "m2499")] == [
        (7, 2499.0)
    ]


class RaiseAt(keras.callbacks.Callback):
    def __init__(self, step, error):
        super().__init__()
        self.step, self.error = step, error

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            raise self.error


@pytest.mark.parametrize(
    ("error", "status"),
    [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")],
    ids=["exception", "ctrl_c"],
)
def test_interrupted_fit_ends_the_mlflow_run(error, status, client, mlflow_url, tmp_path):
    """An exception or Ctrl-C ends the run as FAILED / KILLED on the server."""
    sink = MlflowSink(
        tracking_uri=mlflow_url,
        experiment_name="t",
        run_name=f"interrupted-{status}",
        spool_dir=tmp_path,
    )
    model = make_model(InstrumentedAdam(learning_rate=LR))
    with (
        pytest.raises(type(error)),
        OptimizerStatsLogger(
            close_sinks=True, sinks=[sink], interval=INTERVAL, every_step=True
        ) as logger,
    ):
        fit(model, [logger, RaiseAt(7, error)])
    assert sink.spool_path is None
    run = client.get_run(sink.run_id)
    assert run.info.status == status
    # the read at step 5, then the steps since it (6, 7), read as the run closes (by default
    # steps 6 and 7 would not be measured: the closing read would find nothing new)
    history = client.get_metric_history(sink.run_id, "optimizer/learning_rate")
    assert [m.step for m in history] == [5, 7]


@contextlib.contextmanager
def _no_optiscope_warnings():
    import warnings

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        yield
    assert not optiscope_warnings(records), [str(w.message) for w in records]


# --------------------------------------------------------------------------- outages
class KillServer(keras.callbacks.Callback):
    """Kills the MLflow server (its whole process group, SIGKILL) after step `at`."""

    def __init__(self, server, at):
        super().__init__()
        self.server, self.at = server, at
        self.killed_at = None

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step == self.at and self.killed_at is None:
            servers.kill_group(self.server.process, sig=signal.SIGKILL)
            assert not servers.answers(f"{self.server.url}/health", timeout=1)
            self.killed_at = step


def check_replayed(client, run_id, recorder, run_name):
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == run_name
    assert mlflow_points(client, run_id) == recorder.mlflow_points()
    expected_params = {mlflow_key(k): param_value(v) for k, v in recorder.params.items()}
    assert run.data.params == expected_params
    assert run.data.params["optimizer.class"] == "SignAveraging"


def test_server_killed_during_fit_spools_and_replays(client, mlflow_url, tmp_path, recwarn):
    spool_dir = tmp_path / "spool"
    with servers.mlflow_server_process(tmp_path / "doomed") as doomed:
        sink = MlflowSink(
            tracking_uri=doomed.url,
            experiment_name="outage",
            run_name="killed",
            close_timeout=3,
            retry_interval=0.2,
            spool_dir=spool_dir,
        )
        recorder = RecordingSink()
        killer = KillServer(doomed, at=12)
        model = make_model(SignAveraging(learning_rate=LR))
        logger = OptimizerStatsLogger(close_sinks=True, sinks=[sink, recorder], interval=INTERVAL)
        history = fit(model, [logger, killer])
    assert killer.killed_at == 12
    assert len(history.history["loss"]) == EPOCHS
    assert int(model.optimizer.iterations.numpy()) == TOTAL_STEPS
    assert recorder.closed == ["FINISHED"]

    found = [str(w.message) for w in optiscope_warnings(recwarn.list)]
    assert len(found) == 2, found  # the first failure, and what close left undelivered
    assert sink.spool_path is not None
    assert os.path.isfile(sink.spool_path)
    assert os.path.dirname(sink.spool_path) == str(spool_dir)
    assert all(sink.spool_path in message for message in found), found
    assert "optiscope replay" in found[1]

    run_id = replay_cli(sink.spool_path, mlflow_url)
    check_replayed(client, run_id, recorder, "killed")


def test_server_down_from_the_start_does_not_stall_training(client, mlflow_url, tmp_path, recwarn):
    down = f"http://127.0.0.1:{servers.free_port()}"
    sink = MlflowSink(
        tracking_uri=down,
        experiment_name="outage",
        run_name="never-up",
        close_timeout=2,
        retry_interval=0.2,
        spool_dir=tmp_path / "spool",
    )
    recorder = RecordingSink()
    model = make_model(SignAveraging(learning_rate=LR))
    start = time.monotonic()
    fit(model, [OptimizerStatsLogger(close_sinks=True, sinks=[sink, recorder], interval=INTERVAL)])
    elapsed = time.monotonic() - start
    assert elapsed < 20, f"fit took {elapsed:.1f} s with the tracking server down"
    found = [str(w.message) for w in optiscope_warnings(recwarn.list)]
    assert len(found) == 2, found
    assert sink.spool_path and all(sink.spool_path in message for message in found), found
    assert os.path.isfile(sink.spool_path)

    run_id = replay_cli(sink.spool_path, mlflow_url)
    check_replayed(client, run_id, recorder, "never-up")


class Forwarder:
    """A TCP forwarder to `port` that resets the first `drops` connections once a request
    arrives on them, as a server closing an idle keep-alive connection does, and holds each
    request `delay` seconds, as a slow server does."""

    def __init__(self, port, drops=0, delay=0.0):
        self.target, self.drops, self.delay = port, drops, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            if self.drops:
                self.drops -= 1
                connection.recv(65536)
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.close()  # an RST: "Connection reset by peer"
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for source, sink, delay in (
                (connection, upstream, self.delay),
                (upstream, connection, 0),
            ):
                threading.Thread(target=self._pipe, args=(source, sink, delay), daemon=True).start()

    @staticmethod
    def _pipe(source, sink, delay):
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                time.sleep(delay)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self):
        self.listener.close()


def log_through(forwarder, tmp_path, **options):
    """A sink to the MLflow server behind `forwarder` that logs a loss and a param, then
    closes (and the forwarder with it)."""
    try:
        sink = MlflowSink(tracking_uri=forwarder.url, spool_dir=tmp_path / "spool", **options)
        sink.log_metrics({"loss": 0.5}, step=1)
        sink.log_params({"lr": 0.1})
        sink.close()
    finally:
        forwarder.close()
    return sink


def assert_delivered_without_a_warning(client, sink, recwarn):
    assert optiscope_warnings(recwarn.list) == []
    assert sink.spool_path is None
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"loss": 0.5} and run.data.params == {"lr": "0.1"}


def test_a_dropped_connection_is_retried_without_a_warning(client, mlflow_url, tmp_path, recwarn):
    forwarder = Forwarder(int(mlflow_url.rsplit(":", 1)[1]), drops=1)
    sink = log_through(forwarder, tmp_path, experiment_name="dropped", run_name="dropped-once",
                       asynchronous=False)  # fmt: skip
    assert forwarder.drops == 0  # the first request did meet a reset
    assert_delivered_without_a_warning(client, sink, recwarn)


def test_a_slow_server_is_waited_for_when_the_sink_closes(client, mlflow_url, tmp_path, recwarn):
    """Every request takes longer than `close_timeout`: close waits while delivery progresses
    (a slow store, e.g. a local SQLite file on a busy machine, is not a server that is down)."""
    forwarder = Forwarder(int(mlflow_url.rsplit(":", 1)[1]), delay=1.5)
    sink = log_through(forwarder, tmp_path, experiment_name="slow", run_name="slow-server",
                       close_timeout=0.5)  # fmt: skip
    assert_delivered_without_a_warning(client, sink, recwarn)


# --------------------------------------------------------------------------- TensorBoard
@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    """One fit logged by a `TensorBoardSink` (with histograms, plus a figure) and a recorder;
    then a real TensorBoard on the log directory."""
    logdir = tmp_path_factory.mktemp("tb") / "logs"
    sink = TensorBoardSink(logdir=logdir, run_name="run1")
    recorder = RecordingSink()
    optimizer = InstrumentedAdam(learning_rate=LR)
    model = make_model(optimizer)
    logger = OptimizerStatsLogger(
        close_sinks=True, sinks=[sink, recorder], interval=INTERVAL, histograms=True
    )
    history = fit(model, [logger])
    figure, axes = plt.subplots()
    axes.plot([0, 1, 2], [2, 1, 0.5])
    sink.log_figure("figures/loss_curve", figure, step=TOTAL_STEPS)
    plt.close(figure)
    sink.close()
    with servers.tensorboard_server(logdir) as url:
        yield {"url": url, "recorder": recorder, "history": history.history, "logdir": logdir}


RUN = "run1/optiscope"


def tb_poll(url, path, check):
    """GETs `path` until `check(json)` holds (TensorBoard loads event files in the background)."""
    last = {}

    def ready():
        last["value"] = servers.get_json(url + path)
        return check(last["value"])

    try:
        servers.wait_until(ready, WAIT, interval=0.5, what=f"TensorBoard {path}")
    except TimeoutError:
        pytest.fail(f"TensorBoard {path} never satisfied the check; last answer: {last}")
    return last["value"]


def tb_scalars(url, tag, run=RUN):
    query = urllib.parse.urlencode({"run": run, "tag": tag})
    return servers.get_json(f"{url}/data/plugin/scalars/scalars?{query}")


def test_tensorboard_scalar_tags(tensorboard_run):
    expected = {f"optimizer/{s}/{k}" for s in DEFAULT_STATISTICS for k in KEYS}
    expected |= {f"optimizer/{name}" for name in GLOBAL}
    # Adam measures neither sign statistic by default: left out, not NaN
    signs = ("opt_sign_flip_fraction", "opt_sign_agreement")
    expected |= {f"epoch/{key}" for key in ("loss", *OPT_LOG_KEYS) if key not in signs}
    tags = tb_poll(
        tensorboard_run["url"],
        "/data/plugin/scalars/tags",
        lambda t: RUN in t and expected <= set(t[RUN]),
    )
    assert set(tags) == {RUN}
    assert not {f"epoch/{key}" for key in signs} & set(tags[RUN])


def test_tensorboard_scalar_values(tensorboard_run):
    url, recorder = tensorboard_run["url"], tensorboard_run["recorder"]
    tb_poll(url, "/data/plugin/scalars/tags", lambda t: "optimizer/learning_rate" in t.get(RUN, {}))
    lr = tb_scalars(url, "optimizer/learning_rate")
    read_steps = [step for step, _ in recorder.history("optimizer/learning_rate")]
    assert len(read_steps) >= TOTAL_STEPS // INTERVAL
    assert 0 not in read_steps
    assert [step for _, step, _ in lr] == read_steps
    assert [value for _, _, value in lr] == pytest.approx([LR] * len(lr), rel=1e-6)
    for key in KEYS:
        tag = f"optimizer/grad_norm/{key}"
        points = [(step, value) for _, step, value in tb_scalars(url, tag)]
        recorded = recorder.history(tag)
        assert [s for s, _ in points] == [s for s, _ in recorded], tag
        # TensorBoard keeps scalars as float32
        assert [v for _, v in points] == pytest.approx(
            [float(np.float32(v)) for _, v in recorded], rel=1e-6
        )
    loss = tb_scalars(url, "epoch/loss")
    assert [step for _, step, _ in loss] == list(range(1, EPOCHS + 1))
    assert [v for _, _, v in loss] == pytest.approx(tensorboard_run["history"]["loss"], rel=1e-6)


def test_tensorboard_custom_scalar_layout(tensorboard_run):
    layout = tb_poll(
        tensorboard_run["url"], "/data/plugin/custom_scalars/layout", lambda j: j.get("category")
    )
    charts = {
        chart["title"]: chart["multiline"]["tag"]
        for category in layout["category"]
        for chart in category["chart"]
    }
    tags = servers.get_json(tensorboard_run["url"] + "/data/plugin/scalars/tags")[RUN]
    for statistic in DEFAULT_STATISTICS:
        assert statistic in charts, sorted(charts)
        patterns = [re.compile(p) for p in charts[statistic]]
        for key in KEYS:
            tag = f"optimizer/{statistic}/{key}"
            assert tag in tags
            assert any(p.search(tag) for p in patterns), (statistic, key)
        # a chart draws one statistic only
        for tag in tags:
            if any(p.search(tag) for p in patterns):
                assert tag.split("/")[1] == statistic, (statistic, tag)


def test_tensorboard_hparams(tensorboard_run):
    url = tensorboard_run["url"]
    tb_poll(url, "/data/plugin/scalars/tags", lambda t: "hparams/loss" in t.get(RUN, {}))
    experiment = servers.post_json(
        url + "/data/plugin/hparams/experiment", {"experimentName": "", "includeMetrics": True}
    )
    names = {info["name"] for info in experiment["hparamInfos"]}
    assert {"optimizer", "learning_rate", "beta_1", "beta_2", "epsilon"} <= names
    metrics = {info["name"]["tag"] for info in experiment["metricInfos"]}
    assert "hparams/loss" in metrics
    groups = servers.post_json(
        url + "/data/plugin/hparams/session_groups",
        {
            "experimentName": "",
            "allowedStatuses": [
                "STATUS_UNKNOWN",
                "STATUS_SUCCESS",
                "STATUS_FAILURE",
                "STATUS_RUNNING",
            ],
            "colParams": [],
            "startIndex": 0,
            "sliceSize": 100,
            "includeMetrics": True,
        },
    )
    assert groups["totalSize"] == 1
    (group,) = groups["sessionGroups"]
    assert group["hparams"]["optimizer"] == "Adam"
    assert group["hparams"]["learning_rate"] == pytest.approx(LR, rel=1e-6)
    assert group["hparams"]["beta_1"] == pytest.approx(0.9)
    assert [s["name"] for s in group["sessions"]] == [RUN]
    values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
    assert values["hparams/loss"] == pytest.approx(tensorboard_run["history"]["loss"][-1], rel=1e-6)


def test_tensorboard_hparams_columns_of_runs_with_different_metrics(tmp_path):
    """Two runs in one log directory, as two experiments write them: different hyperparameters
    and different final metrics. The HParams dashboard lists every column of both, and each
    run's values (TensorBoard shows one experiment summary: the first it finds)."""
    logdir = tmp_path / "runs"
    first = TensorBoardSink(logdir=logdir, run_name="rosenbrock/r1/best/Adam", subdir=None)
    first.log_hparams({"optimizer": "Adam", "learning_rate": 0.01}, {"final_distance": 0.5})
    first.close()
    second = TensorBoardSink(logdir=logdir, run_name="convergence/r2/best/SGD", subdir=None)
    second.log_hparams({"optimizer": "SGD", "momentum": 0.9}, {"iterations": 12.0})
    second.close()
    again = TensorBoardSink(logdir=logdir, run_name="convergence/r3/best/SGD", subdir=None)
    again.log_hparams({"optimizer": "SGD", "momentum": 0.5}, {"iterations": 20.0})  # no new name
    again.close()
    with servers.tensorboard_server(logdir) as url:
        tb_poll(url, "/data/plugin/scalars/tags", lambda tags: len(tags) == 3)
        experiment = servers.post_json(
            url + "/data/plugin/hparams/experiment", {"experimentName": "", "includeMetrics": True}
        )
        names = [info["name"] for info in experiment["hparamInfos"]]
        assert sorted(names) == ["learning_rate", "momentum", "optimizer"]
        metrics = sorted(info["name"]["tag"] for info in experiment["metricInfos"])
        assert metrics == ["hparams/final_distance", "hparams/iterations"]
        groups = servers.post_json(
            url + "/data/plugin/hparams/session_groups",
            {
                "experimentName": "",
                "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
                "colParams": [],
                "startIndex": 0,
                "sliceSize": 100,
                "includeMetrics": True,
            },
        )
    values = {
        group["name"]: {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        for group in groups["sessionGroups"]
    }
    assert values["rosenbrock/r1/best/Adam"] == {"hparams/final_distance": 0.5}
    assert values["convergence/r3/best/SGD"] == {"hparams/iterations": 20.0}
    assert len(values) == 3


def test_tensorboard_custom_scalars_open_on_the_latest_experiment(tmp_path):
    """Runs of two experiments and a plain `fit` in one log directory: Custom Scalars lists the
    categories of the run written last first, an experiment's own before the statistics
    (TensorBoard alone would order them by run name), and every category still draws the charts
    of its runs."""
    logdir = tmp_path / "runs"
    statistics = {"grad_norm": ["^optimizer/grad_norm/"]}
    written = [
        ("convergence/r1/best/SGD", "convergence", {"x": ["^x/"]}),
        ("demo/Adam-1", None, None),
        ("rosenbrock/r2/best/Adam", "rosenbrock", {"distance": ["^distance/"]}),
    ]

    def layout_after(*runs):
        for run_name, category, charts in runs:
            sink = TensorBoardSink(logdir=logdir, run_name=run_name, subdir=None)
            sink.log_layout(statistics)
            if category is not None:
                sink.log_layout(charts, category=category)
            sink.log_metrics({"optimizer/grad_norm/all": 1.0}, step=1)
            sink.close()
        with servers.tensorboard_server(logdir, load_fast=False) as url:
            tb_poll(url, "/data/plugin/scalars/tags", lambda tags: run_name in tags)
            return servers.get_json(url + "/data/plugin/custom_scalars/layout")["category"]

    layout = layout_after(*written)
    assert [category["title"] for category in layout] == ["rosenbrock", "optimizer", "convergence"]
    charts = {c["title"]: [chart["title"] for chart in c["chart"]] for c in layout}
    assert charts == {"convergence": ["x"], "optimizer": ["grad_norm"], "rosenbrock": ["distance"]}
    layout = layout_after(("demo/Adam-2", None, None))  # a plain fit last: its statistics first
    assert [category["title"] for category in layout] == ["optimizer", "rosenbrock", "convergence"]


def test_tensorboard_slot_histograms(tensorboard_run):
    expected = {f"slots/{slot}/{key}" for slot in ("momentum", "velocity") for key in KEYS}
    tags = tb_poll(
        tensorboard_run["url"],
        "/data/plugin/histograms/tags",
        lambda t: expected <= set(t.get(RUN, {})),
    )
    assert all(tag.startswith("slots/") for tag in tags[RUN])
    query = urllib.parse.urlencode({"run": RUN, "tag": "slots/momentum/hidden/kernel"})
    data = servers.get_json(f"{tensorboard_run['url']}/data/plugin/histograms/histograms?{query}")
    assert [step for _, step, _ in data] == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]


def test_tensorboard_figure_is_an_image(tensorboard_run):
    tags = tb_poll(
        tensorboard_run["url"],
        "/data/plugin/images/tags",
        lambda t: "figures/loss_curve" in t.get(RUN, {}),
    )
    assert tags[RUN]["figures/loss_curve"]["samples"] == 1


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("interval", [0, -1, 2.5, True, "5", None])
def test_logger_rejects_bad_interval(interval):
    with pytest.raises(ValueError, match="interval"):
        OptimizerStatsLogger(close_sinks=True, sinks=[RecordingSink()], interval=interval)


@pytest.mark.parametrize("fields", [["median"], [], "median", ["mean", "min"]])
def test_logger_rejects_bad_fields(fields):
    with pytest.raises(ValueError, match="fields"):
        OptimizerStatsLogger(close_sinks=True, sinks=[RecordingSink()], fields=fields)


@pytest.mark.parametrize("sinks", [["x"], "x", [RecordingSink(), 3]])
def test_logger_rejects_non_sinks(sinks):
    with pytest.raises(TypeError, match="sinks"):
        OptimizerStatsLogger(close_sinks=True, sinks=sinks)


def test_unwritable_logdir_is_rejected(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    with pytest.raises(ValueError, match="logdir"):
        OptimizerStatsLogger(logdir=blocker / "runs", tracking_uri=f"sqlite:///{tmp_path}/m.db")
    with pytest.raises(ValueError, match="logdir"):
        OptimizerStatsLogger(logdir=blocker, tracking_uri=f"sqlite:///{tmp_path}/m.db")
    with pytest.raises(ValueError, match="logdir"):
        TensorBoardSink(logdir=blocker / "runs", run_name="r")
    with pytest.raises(ValueError, match="logdir"):
        TensorBoardSink(logdir=tmp_path, run_name="a-file")


BAD_URIS = ["http://", "ftp://x", "not a uri://", "", "http://127.0.0.1:notaport", "   "]


@pytest.mark.parametrize("uri", BAD_URIS)
def test_malformed_tracking_uri_is_rejected_by_the_logger(uri, tmp_path):
    with pytest.raises(ValueError, match="tracking_uri"):
        OptimizerStatsLogger(logdir=tmp_path / "runs", tracking_uri=uri)


@pytest.mark.parametrize("uri", BAD_URIS)
def test_malformed_tracking_uri_is_rejected_by_the_sink(uri, tmp_path):
    try:
        sink = MlflowSink(tracking_uri=uri, spool_dir=tmp_path)
    except ValueError as err:
        assert "tracking_uri" in str(err)
    else:  # never deliver to it: drop the sink's journal without closing the run
        sink._journal.close(keep=False)
        pytest.fail(f"MlflowSink accepted tracking_uri={uri!r}")


@pytest.mark.parametrize(
    "argument,value", [("close_timeout", -1), ("retry_interval", -0.5), ("close_timeout", "10")]
)
def test_mlflow_sink_rejects_bad_timeouts(argument, value, tmp_path):
    with pytest.raises(ValueError, match=argument):
        MlflowSink(tracking_uri=f"sqlite:///{tmp_path}/m.db", **{argument: value})


def test_uninstrumented_optimizer_fails_at_fit_start():
    model = make_model(keras.optimizers.Adam(learning_rate=LR))
    before = [w.copy() for w in model.get_weights()]
    recorder = RecordingSink()
    with pytest.raises(ValueError) as info:
        fit(model, [OptimizerStatsLogger(close_sinks=True, sinks=[recorder], interval=INTERVAL)])
    message = str(info.value)
    assert "Adam" in message
    assert "InstrumentedAdam" in message
    assert int(model.optimizer.iterations.numpy()) == 0
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    assert recorder.metrics == []


# --------------------------------------------------------------------------- optiscope ui
def _children(pid):
    """Pids of the direct children of `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                stat = file.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _descendants(pid):
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


def _command_line(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow  # ~30 s: `optiscope ui` starts MLflow with its default 4 workers
def test_ui_starts_both_servers_and_stops_them_on_sigint(tmp_path):
    logdir = tmp_path / "runs"
    logdir.mkdir()
    tb_port = servers.free_port()
    ml_port = servers.free_port()
    while ml_port == tb_port:
        ml_port = servers.free_port()
    command = [
        servers.executable("optiscope"),
        "ui",
        "--logdir", str(logdir),
        "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
        "--tensorboard-port", str(tb_port),
        "--mlflow-port", str(ml_port),
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        preexec_fn=servers.default_sigint,
        cwd=tmp_path,
    )
    lines = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in process.stdout], daemon=True
    ).start()
    children = []
    try:
        urls = {}
        deadline = time.monotonic() + WAIT
        while len(urls) < 2 and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                assert process.poll() is None, f"optiscope ui exited with {process.returncode}"
                continue
            match = re.match(r"(TensorBoard|MLflow UI): (http://\S+)", line)
            if match:
                urls[match.group(1)] = match.group(2)
        assert urls == {
            "TensorBoard": f"http://127.0.0.1:{tb_port}/",
            "MLflow UI": f"http://127.0.0.1:{ml_port}/",
        }
        children = _children(process.pid)
        assert len(children) == 2
        for url in urls.values():
            servers.wait_until(lambda url=url: servers.answers(url), 90, what=f"{url} answering")
        commands = [_command_line(pid) for pid in _descendants(process.pid)]
        assert not [c for c in commands if "huey" in c or "jobs" in c], commands  # no job runner
        assert process.poll() is None

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        for url in urls.values():
            servers.wait_until(
                lambda url=url: not servers.answers(url, timeout=1), 15, what=f"{url} stopping"
            )
        for child in children:
            assert not _alive(child), f"server process {child} still running"
    finally:
        for pid in [process.pid, *children]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


def _alive(pid):
    """True if `pid` runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
