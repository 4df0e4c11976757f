"""Statistics and logging under `tf.distribute`.

Each scenario runs in a subprocess: logical devices must be configured before TensorFlow
initialises, and a multi-worker cluster needs processes of its own. The scripts print (or write)
JSON that the tests check against NumPy: with a global batch of 8 the statistics must be those
of the synchronized update (the gradient of the whole global batch), identical to a run on one
device, and only the chief logs.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.tensorflow_only

FEATURES = 3
SAMPLES = 32
GLOBAL_BATCH = 8
EPOCHS = 2
STEPS = SAMPLES // GLOBAL_BATCH * EPOCHS  # 8
LR = 0.1
KEYS = ("dense/kernel", "dense/bias")

COMMON = f"""
import json
import os
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf

{{devices}}

import keras
import numpy as np

from optiscope.callbacks import OptimizerStatsLogger
from optiscope.optimizers import InstrumentedSGD, SignAveraging, variable_keys
from optiscope.tracking import Sink

FEATURES, SAMPLES, GLOBAL_BATCH, EPOCHS, LR = {FEATURES}, {SAMPLES}, {GLOBAL_BATCH}, {EPOCHS}, {LR}
OPTIMIZERS = {{"sgd": lambda: InstrumentedSGD(LR), "sign_averaging": lambda: SignAveraging(0.3)}}


def make_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype("float32")
    y = (x @ np.array([[0.5], [-1.0], [0.25]]) + 0.2).astype("float32")
    return x, y


INITIAL = [np.array([[0.3], [0.2], [-0.1]], "float32"), np.array([0.05], "float32")]


class RecordingSink(Sink):
    def __init__(self):
        self.calls = []

    def log_params(self, params):
        self.calls.append(["log_params"])

    def log_metrics(self, metrics, step):
        self.calls.append(["log_metrics", sorted(metrics), step])

    def log_layout(self, charts, category="optimizer"):
        self.calls.append(["log_layout"])

    def log_hparams(self, hparams, metrics):
        self.calls.append(["log_hparams"])

    def close(self, status="FINISHED"):
        self.calls.append(["close", status])


class Recorder(keras.callbacks.Callback):
    \"\"\"Weights before and after every step and the statistics of that step (`last`).\"\"\"

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer = optimizer
        self.steps = []

    def on_train_batch_begin(self, batch, logs=None):
        self.before = [w.numpy().tolist() for w in self.model.trainable_variables]

    def on_train_batch_end(self, batch, logs=None):
        statistics = self.optimizer.statistics(reset=False)
        self.steps.append(
            {{
                "step": statistics.step,
                "before": self.before,
                "after": [w.numpy().tolist() for w in self.model.trainable_variables],
                "stats": {{
                    name if group is None else f"{{name}}/{{group}}": summary.last
                    for (name, group), summary in statistics.items()
                }},
            }}
        )


def run(name, scope, prepare=lambda model: None):
    x, y = make_data()
    with scope:
        inputs = keras.Input((FEATURES,))
        model = keras.Model(inputs, keras.layers.Dense(1, name="dense")(inputs), name="linear")
        model.set_weights(INITIAL)
        optimizer = OPTIMIZERS[name]()
        model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    prepare(model)
    sink = RecordingSink()
    recorder = Recorder(optimizer)
    model.fit(
        x,
        y,
        batch_size=GLOBAL_BATCH,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=[recorder, OptimizerStatsLogger(close_sinks=True, sinks=sink, interval=1)],
    )
    return {{
        "keys": variable_keys(model.trainable_variables),
        "steps": recorder.steps,
        "sink": sink.calls,
        "weights": [w.numpy().tolist() for w in model.trainable_variables],
        "iterations": int(optimizer.iterations.numpy()),
    }}
"""

MIRRORED = """
import contextlib

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
results = {"replicas": strategy.num_replicas_in_sync}
for name in OPTIMIZERS:
    results[name] = {
        "mirrored": run(name, strategy.scope()),
        "single": run(name, contextlib.nullcontext()),
    }
print("RESULT " + json.dumps(results))
"""

TWO_CPUS = """
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
"""

MULTI_WORKER = """
# Keras 3.15's TensorFlow trainer stumbles over two things under MultiWorkerMirroredStrategy
# that have nothing to do with optiscope: its symbolic build reduces a data batch of
# `PerReplica` values across workers, and it reduces scalar logs with `axis=0`. Build
# everything up front and reduce the logs per worker instead.
import keras.src.backend.tensorflow.trainer as keras_tf_trainer

keras_tf_trainer._collective_all_reduce_multi_worker = lambda strategy: False


def prepare(model):
    with model.distribute_strategy.scope():
        model.optimizer.build(model.trainable_variables)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None


strategy = tf.distribute.MultiWorkerMirroredStrategy()
result = run("sgd", strategy.scope(), prepare)
result["replicas"] = strategy.num_replicas_in_sync
result["task"] = [strategy.cluster_resolver.task_type, strategy.cluster_resolver.task_id]
with open(sys.argv[1], "w") as handle:
    json.dump(result, handle)
"""


def script(body, devices=""):
    return textwrap.dedent(COMMON.replace("{devices}", devices)) + textwrap.dedent(body)


def make_data():
    """The scripts' data, in float64."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype("float32")
    y = (x @ np.array([[0.5], [-1.0], [0.25]]) + 0.2).astype("float32")
    return x.astype(np.float64), y.astype(np.float64)


def global_batch_gradients(step_index, before):
    """Gradient of the MSE over the whole global batch (unshuffled), at the weights `before`."""
    x, y = make_data()
    batch = step_index % (SAMPLES // GLOBAL_BATCH)
    rows = slice(batch * GLOBAL_BATCH, (batch + 1) * GLOBAL_BATCH)
    kernel, bias = (np.asarray(w, np.float64) for w in before)
    residual = x[rows] @ kernel + bias - y[rows]
    return [2.0 * x[rows].T @ residual / GLOBAL_BATCH, 2.0 * residual.sum(axis=0) / GLOBAL_BATCH]


def check_synchronized(run, rtol=1e-5):
    """Every step's statistics are those of the update computed from the whole global batch."""
    assert run["keys"] == list(KEYS)
    assert run["iterations"] == STEPS
    assert [s["step"] for s in run["steps"]] == list(range(1, STEPS + 1))
    for t, step in enumerate(run["steps"]):
        gradients = global_batch_gradients(t, step["before"])
        stats = step["stats"]
        for key, gradient, before, after in zip(
            KEYS, gradients, step["before"], step["after"], strict=True
        ):
            np.testing.assert_allclose(
                stats[f"grad_norm/{key}"],
                np.linalg.norm(gradient),
                rtol=rtol,
                atol=1e-6,  # a float32 mean of residuals that nearly cancel
                err_msg=key,
            )
            change = np.asarray(after, np.float64) - np.asarray(before, np.float64)
            np.testing.assert_allclose(
                stats[f"update_norm/{key}"],
                np.linalg.norm(change),
                rtol=1e-4,
                atol=1e-8,
                err_msg=key,
            )
            np.testing.assert_allclose(
                stats[f"weight_norm/{key}"], np.linalg.norm(after), rtol=1e-6, err_msg=key
            )
        np.testing.assert_allclose(
            stats["global_grad_norm"],
            np.sqrt(sum(np.sum(g**2) for g in gradients)),
            rtol=rtol,
        )


def check_logged_once_per_step(calls):
    steps = [call[2] for call in calls if call[0] == "log_metrics" and call[1][0].startswith("opt")]
    assert steps == list(range(1, STEPS + 1))  # each step once, not once per replica
    assert [call for call in calls if call[0] == "close"] == [["close", "FINISHED"]]
    assert [call[0] for call in calls].count("log_params") == 1


def run_script(path, *args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_mirrored_strategy_two_cpus(tmp_path):
    path = tmp_path / "mirrored.py"
    path.write_text(script(MIRRORED, TWO_CPUS))
    result = run_script(path)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    results = json.loads(line[len("RESULT ") :])
    assert results["replicas"] == 2

    for name in ("sgd", "sign_averaging"):
        mirrored, single = results[name]["mirrored"], results[name]["single"]
        check_synchronized(mirrored)
        check_synchronized(single)
        check_logged_once_per_step(mirrored["sink"])
        # The same training as on one device.
        for distributed, alone in zip(mirrored["steps"], single["steps"], strict=True):
            for a, b in zip(distributed["after"], alone["after"], strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)
            for stat, value in alone["stats"].items():
                np.testing.assert_allclose(
                    distributed["stats"][stat], value, rtol=1e-4, atol=1e-7, err_msg=stat
                )
        for a, b in zip(mirrored["weights"], single["weights"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    # Plain gradient descent: the synchronized update is lr times the global-batch gradient.
    for step in results["sgd"]["mirrored"]["steps"]:
        gradients = global_batch_gradients(step["step"] - 1, step["before"])
        for gradient, before, after in zip(gradients, step["before"], step["after"], strict=True):
            np.testing.assert_allclose(
                np.asarray(after), np.asarray(before) - LR * gradient, rtol=1e-5, atol=1e-7
            )
    # SignAveraging: its sign statistics are those of the synchronized gradients too.
    flips = [
        s["stats"]["sign_flip_fraction/dense/kernel"]
        for s in results["sign_averaging"]["mirrored"]["steps"]
    ]
    assert flips == [
        s["stats"]["sign_flip_fraction/dense/kernel"]
        for s in results["sign_averaging"]["single"]["steps"]
    ]
    assert any(f > 0 for f in flips), "the premise: some gradient changes sign"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_mirrored_strategy(tmp_path):
    """Two local workers: the same synchronized statistics on both, and only the chief logs."""
    path = tmp_path / "worker.py"
    path.write_text(script(MULTI_WORKER))
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    processes, outputs = [], []
    for index in range(2):
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        )
        output = tmp_path / f"worker{index}.json"
        outputs.append(output)
        processes.append(
            subprocess.Popen(
                [sys.executable, str(path), str(output)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
        )
    logs = []
    try:
        for process in processes:
            logs.append(process.communicate(timeout=120)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log[-3000:]

    chief, other = (json.loads(output.read_text()) for output in outputs)
    assert chief["task"] == ["worker", 0]
    assert other["task"] == ["worker", 1]
    assert chief["replicas"] == other["replicas"] == 2

    check_synchronized(chief)
    for mine, theirs in zip(chief["steps"], other["steps"], strict=True):
        assert mine["stats"] == theirs["stats"]
        assert mine["after"] == theirs["after"]
    # Gradient descent: grad_norm is the norm of the applied (synchronized) step over lr.
    for step in chief["steps"]:
        for key, before, after in zip(KEYS, step["before"], step["after"], strict=True):
            change = np.asarray(after, np.float64) - np.asarray(before, np.float64)
            np.testing.assert_allclose(
                step["stats"][f"grad_norm/{key}"], np.linalg.norm(change) / LR, rtol=1e-4
            )

    check_logged_once_per_step(chief["sink"])
    assert other["sink"] == []  # not the chief: a NullSink, the given sinks get nothing
