"""Faults: a training process killed with SIGKILL, a tracking server restarted mid-fit, a
training resumed from a `.keras` checkpoint.

Every point the logger produced is counted (in the journal, or by a recording sink) and
compared with the points a real `mlflow server` stores; the counts are in the assertion
messages and printed (`pytest -s`).
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import servers
from mlflow.tracking import MlflowClient

from optiscope.callbacks import OptimizerStatsLogger
from optiscope.optimizers import InstrumentedAdam
from optiscope.tracking import MlflowSink, Sink, TensorBoardSink, journal, mlflow_key
from optiscope.tracking.naming import KEY_PARAM_PREFIX

FEATURES, BATCH = 4, 8
WAIT = 120.0

TRAINING_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    from optiscope.callbacks import OptimizerStatsLogger
    from optiscope.optimizers import InstrumentedAdam
    from optiscope.tracking import MlflowSink

    url, spool, marker = sys.argv[1:4]
    MARK = 20

    class Mark(keras.callbacks.Callback):
        '''At step MARK: stop delivering (the rest stays in the journal only), say so, and
        train slowly until killed.'''

        def __init__(self, sink):
            super().__init__()
            self.sink = sink

        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            if step == MARK:
                self.sink.flush()
                self.sink.flush_interval = 3600.0
                with open(marker, "w") as file:
                    file.write(str(step))
            if step >= MARK:
                time.sleep(0.3)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, name="hidden"), keras.layers.Dense(1, name="out")]
    )
    model.compile(optimizer=InstrumentedAdam(learning_rate=0.01), loss="mse")
    sink = MlflowSink(
        tracking_uri=url, experiment_name="faults", run_name="sigkilled", spool_dir=spool,
        flush_interval=0.2, retry_interval=0.2,
    )
    logger = OptimizerStatsLogger(sinks=[sink], interval=3)
    model.fit(x, y, batch_size=8, epochs=1000, verbose=0, callbacks=[logger, Mark(sink)])
    """
)


def make_data(rows):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, FEATURES)).astype("float32")
    return x, (x @ rng.normal(size=(FEATURES, 1)) + 0.5).astype("float32")


def make_model():
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
    model.compile(optimizer=InstrumentedAdam(learning_rate=0.01), loss="mse")
    return model


class RecordingSink(Sink):
    def __init__(self):
        self.metrics = []  # (dict, step) per call

    def log_metrics(self, metrics, step):
        self.metrics.append((dict(metrics), int(step)))

    def log_hparams(self, hparams, metrics):  # an MlflowSink logs these as final/<name>
        self.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step=1)

    def points(self, prefix=""):
        """`{(key, step): value}` of every metric whose tag starts with `prefix`."""
        return {
            (tag, step): float(value)
            for metrics, step in self.metrics
            for tag, value in metrics.items()
            if tag.startswith(prefix)
        }


def stored_points(client, run_id):
    """Every metric point of a run: `[(key, step, timestamp)]`, duplicates included."""
    return [
        (key, m.step, m.timestamp)
        for key in client.get_run(run_id).data.metrics
        for m in client.get_metric_history(run_id, key)
    ]


@pytest.mark.slow
def test_sigkilled_training_is_found_and_replayed_into_its_run(tmp_path):
    spool, marker = tmp_path / "spool", tmp_path / "marker"
    script = tmp_path / "train.py"
    script.write_text(TRAINING_SCRIPT)
    log = tmp_path / "train.log"
    with servers.mlflow_server_process(tmp_path / "mlflow") as server, open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, str(script), server.url, str(spool), str(marker)],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            servers.wait_until(
                lambda: marker.exists() or process.poll() is not None, WAIT, what="marker"
            )
            assert marker.exists(), log.read_text()[-3000:]
            time.sleep(2.0)  # a few more reads, journaled only
        finally:
            servers.kill_group(process, sig=signal.SIGKILL)
        assert process.returncode == -signal.SIGKILL

        (path,) = spool.glob("*.jsonl")
        header, records = journal.read(path)
        produced = {
            (key, step, timestamp)
            for record in records
            if record["kind"] == "metrics"
            for key, _, timestamp, step in record["metrics"]
        }
        run_id = next(r["run_id"] for r in records if r["kind"] == "run_id")
        assert header["pid"] == process.pid and header["tracking_uri"] == server.url
        client = MlflowClient(server.url)
        before = stored_points(client, run_id)
        assert 0 < len(before) < len(produced), (len(before), len(produced))
        assert client.get_run(run_id).info.status == "RUNNING"

        # The next logger start names the journal.
        model = make_model()
        sink = MlflowSink(tracking_uri=server.url, experiment_name="faults", spool_dir=spool)
        with pytest.warns(RuntimeWarning, match=f"left undelivered.*{re.escape(str(path))}"):
            model.fit(*make_data(16), batch_size=BATCH, verbose=0,
                      callbacks=[OptimizerStatsLogger(sinks=[sink], interval=2)])  # fmt: skip
        assert journal.pending(spool) == [str(path)]

        result = subprocess.run(
            [servers.executable("optiscope"), "replay", "--pending", "--spool-dir", str(spool)],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"into run {run_id}" in result.stdout, result.stdout
        after = stored_points(client, run_id)
        counts = (
            f"produced {len(produced)} points, {len(before)} stored before the replay, "
            f"{len(after)} after ({len(set(after))} distinct)"
        )
        print(counts)
        assert len(after) == len(set(after)) and set(after) == produced, counts
        run = client.get_run(run_id)
        last = max(r.get("time", 0) for r in [header, *records])
        assert (run.info.status, run.info.end_time) == ("KILLED", last), counts
        assert journal.pending(spool) == []
        runs = client.search_runs([run.info.experiment_id])
        assert sorted(r.info.run_name for r in runs) == sorted(["sigkilled", sink.run_name])


class RestartServer(keras.callbacks.Callback):
    """Stops the MLflow server after step `stop_at` and starts it again (same port, same
    store) after step `start_at`."""

    def __init__(self, stack, server, stop_at, start_at):
        super().__init__()
        self.stack, self.server = stack, server
        self.stop_at, self.start_at = stop_at, start_at

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step == self.stop_at:
            self.server.stop()
            assert not servers.answers(f"{self.server.url}/health", timeout=1)
        elif step == self.start_at:
            store = os.path.dirname(self.server.log_path)
            self.stack.enter_context(servers.mlflow_server_process(store, port=self.server.port))


@pytest.mark.slow
def test_server_restarted_mid_fit_leaves_one_complete_run(tmp_path, recwarn):
    store = tmp_path / "mlflow"
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(servers.mlflow_server_process(store))
        sink = MlflowSink(
            tracking_uri=server.url,
            experiment_name="restart",
            run_name="restarted",
            spool_dir=tmp_path / "spool",
            flush_interval=0.2,
            retry_interval=0.2,
            close_timeout=30,
        )
        recorder = RecordingSink()
        model = make_model()
        model.fit(
            *make_data(64),
            batch_size=BATCH,
            epochs=3,
            verbose=0,
            callbacks=[
                OptimizerStatsLogger(sinks=[sink, recorder], interval=3, close_sinks=True),
                RestartServer(stack, server, stop_at=6, start_at=14),
            ],
        )
        assert sink.spool_path is None, sink.last_error
        client = MlflowClient(server.url)
        runs = client.search_runs([client.get_experiment_by_name("restart").experiment_id])
        stored = stored_points(client, sink.run_id)
        sent = {(mlflow_key(tag), step) for tag, step in recorder.points()}
        counts = (
            f"{len(runs)} run(s); sent {len(sent)} points, stored {len(stored)} "
            f"({len({(k, s) for k, s, _ in stored})} distinct)"
        )
        print(counts)
        assert [r.info.run_id for r in runs] == [sink.run_id], counts
        assert runs[0].info.status == "FINISHED", counts
        assert len(stored) == len(set(stored)), counts
        assert {(k, s) for k, s, _ in stored} == sent, counts
    messages = [str(w.message) for w in recwarn.list if "optiscope" in str(w.message)]
    assert len(messages) == 1 and sink.journal_path in messages[0], messages


def test_resumed_training_logs_at_the_uninterrupted_steps(tmp_path):
    """7 steps an epoch, a read every 3 steps: an uninterrupted 3-epoch run and one resumed
    from its epoch-2 `.keras` checkpoint read at the same steps, with the same values, into
    one MLflow run."""
    x, y = make_data(56)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    straight = RecordingSink()
    fit = dict(batch_size=BATCH, shuffle=False, verbose=0)
    make_model().fit(
        x,
        y,
        epochs=3,
        callbacks=[OptimizerStatsLogger(straight, interval=3, close_sinks=True)],
        **fit,
    )

    first = RecordingSink()
    model = make_model()
    mlflow_sink = MlflowSink(tracking_uri=uri, run_name="resumed", spool_dir=tmp_path / "spool")
    logger = OptimizerStatsLogger([first, mlflow_sink], interval=3, close_sinks=True)
    model.fit(x, y, epochs=2, callbacks=[logger], **fit)
    model.save(tmp_path / "epoch2.keras")

    resumed = RecordingSink()
    loaded = keras.models.load_model(tmp_path / "epoch2.keras")
    again = MlflowSink(tracking_uri=uri, run_id=mlflow_sink.run_id, spool_dir=tmp_path / "spool")
    loaded.fit(
        x,
        y,
        initial_epoch=2,
        epochs=3,
        callbacks=[OptimizerStatsLogger([resumed, again], interval=3, close_sinks=True)],
        **fit,
    )

    want = straight.points("optimizer/")
    got = {**first.points("optimizer/"), **resumed.points("optimizer/")}
    steps = sorted({step for _, step in want})
    assert steps == [3, 6, 7, 9, 12, 14, 15, 18, 21]
    assert sorted({step for _, step in got}) == steps
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5, atol=1e-7)

    client = MlflowClient(uri)
    run = client.get_run(mlflow_sink.run_id)
    assert run.info.status == "FINISHED"
    history = [
        m.step for m in client.get_metric_history(run.info.run_id, "optimizer/learning_rate")
    ]
    assert history == steps
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_pending_ignores_live_and_replayed_journals(tmp_path):
    live = journal.Journal(tmp_path, {"run_name": "live"})
    dead = journal.Journal(tmp_path, {"run_name": "dead"})
    dead.close(keep=True)
    header, _ = journal.read(dead.path)
    header["pid"] = _dead_pid()
    lines = [json.dumps(header), json.dumps({"kind": "end", "status": "FINISHED", "time": 1})]
    with open(dead.path, "w") as file:
        file.write("\n".join(lines) + "\n")
    assert journal.pending(tmp_path) == [dead.path]
    with open(dead.path, "a") as file:
        file.write(json.dumps({"kind": "replayed", "run_id": "x", "time": 2}) + "\n")
    assert journal.pending(tmp_path) == []
    live.close(keep=False)


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_long_variable_paths_keep_every_series_apart(tmp_path):
    """Three layers whose 241-character names differ only in the last character: every series
    keeps a key of its own, and the params name the full tag behind each rewritten key."""
    names = ["layer_" * 40 + str(i) for i in range(3)]
    model = keras.Sequential(
        [keras.Input((FEATURES,)), *[keras.layers.Dense(2, name=n) for n in names]]
        + [keras.layers.Dense(1, name="out")]
    )
    model.compile(optimizer=InstrumentedAdam(learning_rate=0.01), loss="mse")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sink = MlflowSink(tracking_uri=uri, run_name="long", spool_dir=tmp_path / "spool")
    recorder = RecordingSink()
    logger = OptimizerStatsLogger([sink, recorder], interval=2)
    model.fit(*make_data(32), batch_size=BATCH, epochs=1, verbose=0, callbacks=[logger])
    assert sink.spool_path is None, sink.last_error

    client = MlflowClient(uri)
    run = client.get_run(sink.run_id)
    full_names = {
        key.removeprefix(KEY_PARAM_PREFIX): value
        for key, value in run.data.params.items()
        if key.startswith(KEY_PARAM_PREFIX)
    }
    sent = {}
    for (tag, step), value in recorder.points().items():
        sent.setdefault(tag, []).append((step, value))
    stored = {}
    for key in run.data.metrics:
        (tag,) = [full for digest, full in full_names.items() if f"_{digest}" in key] or [key]
        assert tag not in stored, f"two keys for {tag!r}"
        stored[tag] = [(m.step, m.value) for m in client.get_metric_history(sink.run_id, key)]
    long_tags = [tag for tag in sent if len(tag) > 250]
    counts = (
        f"sent {len(sent)} series ({len(long_tags)} of them > 250 characters), stored {len(stored)}"
    )
    print(counts)
    assert long_tags and all(len(key) <= 250 for key in run.data.metrics), counts
    assert len(run.data.metrics) == len(sent) and stored.keys() == sent.keys(), counts
    for tag, points in sent.items():
        np.testing.assert_allclose(sorted(stored[tag]), sorted(points), err_msg=tag)


def test_tensorboard_run_continued_from_a_checkpoint_drops_the_later_points(tmp_path):
    """A run directory logged to step 10, continued from step 5 (`purge_step=6`): TensorBoard's
    own reader shows steps 1..5 of the first writer and 6..8 of the second, nothing twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardSink(logdir=tmp_path, run_name="r")
    for step in range(1, 11):
        first.log_metrics({"loss": float(step)}, step)
    first.close()
    time.sleep(1.1)  # event files are named by the second they are created in
    again = TensorBoardSink(logdir=tmp_path, run_name="r", purge_step=6)
    for step in range(6, 9):
        again.log_metrics({"loss": 100.0 + step}, step)
    again.close()

    reader = EventAccumulator(str(tmp_path / "r" / "optiscope"))
    reader.Reload()
    points = [(e.step, e.value) for e in reader.Scalars("loss")]
    assert points == [(s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 9)]
