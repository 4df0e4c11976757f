"""`DivergenceGuard` on the one-dimensional test of the convergence experiment.

L(x) = 2x⁴ + 3x³ + 2 from x = 2 with gradient descent at lr 0.1 explodes: in float32 the gradient
is Inf at step 5 (x₄ ≈ 2.8e22) and NaN at step 6 (x₅ = -Inf), the step where the guide's table
says it "exploded at iteration 6". The model has one scalar weight x and outputs L(x); the loss
is the output itself, and every batch (one dummy sample) is one optimizer step.
"""

import threading
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from optiscope.callbacks import DivergenceGuard
from optiscope.optimizers import InstrumentedSGD, variable_keys
from optiscope.tracking import Sink

LR = 0.1
X0 = 2.0


class Quartic(keras.layers.Layer):
    """Outputs L(x) = 2x⁴ + 3x³ + 2 of its one weight, for every sample."""

    def build(self, input_shape):
        self.x = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(X0), name="x", dtype="float32"
        )

    def call(self, inputs):
        x = self.x
        value = 2.0 * ops.power(x, 4) + 3.0 * ops.power(x, 3) + 2.0
        return ops.zeros_like(inputs) + value


def output_as_loss(y_true, y_pred):
    return y_pred


def make_model(optimizer):
    inputs = keras.Input((1,))
    model = keras.Model(inputs, Quartic(name="quartic")(inputs), name="one_dimensional")
    model.compile(optimizer=optimizer, loss=output_as_loss, jit_compile=False)
    return model


class WeightHistory(keras.callbacks.Callback):
    """x after every step."""

    def __init__(self):
        super().__init__()
        self.values = []

    def on_train_batch_end(self, batch, logs=None):
        self.values.append(float(self.model.trainable_variables[0].numpy()))


def train(optimizer, guard, epochs=20):
    """One dummy sample, batch 1: one step per epoch."""
    model = make_model(optimizer)
    history = WeightHistory()
    zeros = np.zeros((1, 1), "float32")
    fit_history = model.fit(
        zeros, zeros, batch_size=1, epochs=epochs, verbose=0, callbacks=[history, guard]
    )
    return model, history.values, fit_history


def numpy_descent(steps):
    """Float32 gradient descent on L: x_{t+1} = x_t - lr * (8 x³ + 9 x²)."""
    x = np.float32(X0)
    lr = np.float32(LR)
    values = []
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(steps):
            gradient = np.float32(8) * x**3 + np.float32(9) * x**2
            x = np.float32(x - lr * gradient)
            values.append(x)
    return values


class RecordingSink(Sink):
    def __init__(self):
        self.calls = []
        self._lock = threading.Lock()

    def _record(self, *call):
        with self._lock:
            self.calls.append(call)

    def log_metrics(self, metrics, step):
        self._record("log_metrics", dict(metrics), step)

    def log_event(self, message, step):
        self._record("log_event", message, step)

    def flush(self):
        self._record("flush")

    def close(self, status="FINISHED"):
        self._record("close", status)


# --------------------------------------------------------------------------- the premise
def test_numpy_reference_explodes_at_step_6():
    values = numpy_descent(6)
    assert values[0] == -8.0
    assert values[1] == 344.0
    assert np.isfinite(values[:4]).all()
    assert values[4] == -np.inf  # the gradient at x₄ overflows to Inf at step 5
    assert np.isnan(values[5])  # 8·(-Inf)³ + 9·(-Inf)² = NaN at step 6


def test_large_finite_gradient_has_a_finite_norm():
    """At step 4 the gradient is -2.79e23, finite in float32 (max 3.4e38), so its norm is too
    (grad_norm = ‖g‖₂); only at step 5 does the gradient itself overflow to Inf."""
    optimizer = InstrumentedSGD(LR, statistics=["default", "nonfinite_grad_count"])
    model, values, _ = train(optimizer, keras.callbacks.Callback(), epochs=4)
    key = variable_keys(model.trainable_variables)[0]
    statistics = optimizer.statistics()
    x3, x4 = (float(v) for v in numpy_descent(4)[2:4])
    gradient = 8.0 * x3**3 + 9.0 * x3**2  # ≈ -2.79e23
    assert statistics[("grad_norm", key)].last == pytest.approx(abs(gradient), rel=1e-5)
    assert statistics[("global_grad_norm", None)].last == pytest.approx(abs(gradient), rel=1e-5)
    assert statistics[("weight_norm", key)].last == pytest.approx(abs(x4), rel=1e-5)
    assert statistics[("update_norm", key)].last == pytest.approx(abs(x4 - x3), rel=1e-5)
    assert statistics[("nonfinite_grad_count", key)].total == 0
    assert statistics.first_nonfinite() is None


# --------------------------------------------------------------------------- stopping
def check_trajectory(values, steps):
    expected = numpy_descent(steps)
    assert len(values) == steps
    assert values[:2] == [-8.0, 344.0]
    np.testing.assert_allclose(values[:4], expected[:4], rtol=1e-6)
    assert values[4] == -np.inf


def test_nan_trigger_stops_at_step_6():
    guard = DivergenceGuard(trigger="nan")
    optimizer = InstrumentedSGD(LR)
    model, values, _ = train(optimizer, guard)
    key = variable_keys(model.trainable_variables)[0]

    assert int(optimizer.iterations) == 6  # stopped, not one step more
    check_trajectory(values, 6)
    assert np.isnan(values[5])

    report = guard.report
    assert report["step"] == 6
    assert report["statistic"] == "grad_norm"
    assert report["variable"] == key
    assert np.isnan(report["value"])
    assert report["began_at"] == 5
    assert report["first_statistic"] == "grad_norm"
    assert report["first_variable"] == key
    message = report["message"]
    assert "step 6" in message
    assert "grad_norm" in message
    assert key in message
    assert "began at step 5" in message


def test_nonfinite_trigger_stops_at_step_5():
    guard = DivergenceGuard()  # trigger="nonfinite"
    optimizer = InstrumentedSGD(LR)
    model, values, _ = train(optimizer, guard)
    key = variable_keys(model.trainable_variables)[0]

    assert int(optimizer.iterations) == 5
    check_trajectory(values, 5)
    report = guard.report
    assert report["step"] == 5
    assert report["statistic"] == "grad_norm"
    assert report["variable"] == key
    assert report["value"] == np.inf
    assert report["began_at"] == 5
    assert "step 5" in report["message"]


def test_scheduled_reads_still_find_the_first_nonfinite_gradient():
    """With reads scheduled every 100 steps (as `OptimizerStatsLogger` does), steps 1-4 are not
    measured, but the non-finite gradients of steps 5 and 6 are, so the report is the same."""
    guard = DivergenceGuard(trigger="nan")
    optimizer = InstrumentedSGD(LR)
    optimizer.schedule_reads(guard, every=100)
    model, values, _ = train(optimizer, guard)
    key = variable_keys(model.trainable_variables)[0]

    assert int(optimizer.iterations) == 6
    check_trajectory(values, 6)
    assert optimizer.statistics().steps == 2  # steps 5 and 6 only
    report = guard.report
    assert (report["step"], report["statistic"], report["variable"]) == (6, "grad_norm", key)
    assert (report["began_at"], report["first_statistic"]) == (5, "grad_norm")
    assert report["first_variable"] == key


def test_check_every_reports_where_it_began():
    """Checked every 4 steps, the NaN is found at step 8, and the report says it began at 5."""
    guard = DivergenceGuard(trigger="nan", check_every=4)
    optimizer = InstrumentedSGD(LR)
    train(optimizer, guard)
    assert int(optimizer.iterations) == 8
    assert guard.report["step"] == 8
    assert guard.report["began_at"] == 5
    assert "began at step 5" in guard.report["message"]


def test_warn_action_continues_and_warns_once():
    guard = DivergenceGuard(action="warn", trigger="nan")
    optimizer = InstrumentedSGD(LR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, values, history = train(optimizer, guard, epochs=10)
    assert int(optimizer.iterations) == 10  # all epochs ran
    assert len(history.history["loss"]) == 10
    assert len(values) == 10
    diverged = [w for w in caught if "diverged" in str(w.message)]
    assert len(diverged) == 1, [str(w.message) for w in caught]
    assert issubclass(diverged[0].category, RuntimeWarning)
    assert str(diverged[0].message) == guard.report["message"]
    assert guard.report["step"] == 6


@pytest.mark.parametrize(("trigger", "step"), [("nan", 6), ("nonfinite", 5)])
def test_uninstrumented_optimizer_stops_on_the_loss(trigger, step):
    """Without statistics the guard watches the loss: L(x₄) overflows to Inf at step 5 and
    L(x₅ = -Inf) = Inf - Inf = NaN at step 6."""
    guard = DivergenceGuard(trigger=trigger)
    optimizer = keras.optimizers.SGD(LR)
    _, values, history = train(optimizer, guard)
    assert int(optimizer.iterations) == step
    assert len(values) == step
    report = guard.report
    assert report["step"] == step
    assert f"step {step}" in report["message"]
    assert "loss" in report["message"]
    if trigger == "nan":
        assert np.isnan(history.history["loss"][-1])


def test_sinks_get_the_event_and_the_step():
    sink = RecordingSink()
    guard = DivergenceGuard(trigger="nan", sinks=sink)
    train(InstrumentedSGD(LR), guard)
    message = guard.report["message"]
    assert ("log_event", message, 6) in sink.calls
    assert ("log_metrics", {"diverged_at_step": 6}, 6) in sink.calls
    assert [call for call in sink.calls if call[0] == "log_event"] == [("log_event", message, 6)]
    assert not [call for call in sink.calls if call[0] == "close"]  # the guard owns no run


def test_sinks_as_a_list():
    sinks = [RecordingSink(), RecordingSink()]
    guard = DivergenceGuard(trigger="nan", sinks=sinks)
    train(InstrumentedSGD(LR), guard)
    for sink in sinks:
        assert ("log_metrics", {"diverged_at_step": 6}, 6) in sink.calls


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"action": "x"}, "action"),
        ({"trigger": "inf"}, "trigger"),
        ({"check_every": 0}, "check_every"),
        ({"check_every": 1.5}, "check_every"),
        ({"check_every": True}, "check_every"),
    ],
)
def test_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        DivergenceGuard(**kwargs)
