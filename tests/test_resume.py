"""Saving and loading a model mid-training changes neither the trajectory nor the statistics.

A run of N + M steps is compared with one saved to a `.keras` file after N steps, loaded with
`keras.models.load_model` (no `custom_objects`) and trained M more steps. The statistics are
read at the same steps in both runs, and one read window spans the save.
"""

import re

import keras
import numpy as np
import pytest

from optiscope.optimizers import InstrumentedAdam, SignAveraging

FEATURES = 8
BATCH = 8
STEPS_BEFORE = 6  # N
STEPS_AFTER = 6  # M
READ_EVERY = 4  # reads at steps 4, 8 and 12: the window 5..8 spans the save


def make_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=((STEPS_BEFORE + STEPS_AFTER) * BATCH, FEATURES)).astype("float32")
    y = (x @ rng.normal(size=(FEATURES, 1)) - 0.2).astype("float32")
    return x, y


def make_model(optimizer, sequential=False):
    """Dense(4, relu) -> Dense(1); functional by default (its variable paths survive loading)."""
    layers = [
        keras.layers.Dense(4, activation="relu", name="hidden"),
        keras.layers.Dense(1, name="out"),
    ]
    if sequential:
        model = keras.Sequential([keras.Input((FEATURES,)), *layers], name="net")
    else:
        inputs = keras.Input((FEATURES,))
        model = keras.Model(inputs, layers[1](layers[0](inputs)), name="net")
    rng = np.random.default_rng(1)
    model.set_weights(
        [rng.normal(scale=0.5, size=w.shape).astype("float32") for w in model.weights]
    )
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    return model


def train(model, first, last, reads):
    """Steps `first`..`last - 1` (0-based), reading the statistics every READ_EVERY steps."""
    x, y = make_data()
    for step in range(first, last):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        model.train_on_batch(x[rows], y[rows])
        if (step + 1) % READ_EVERY == 0:
            reads[step + 1] = model.optimizer.statistics()


OPTIMIZERS = {
    "sign_averaging": lambda: SignAveraging(learning_rate=0.05, statistics="all"),
    "adam": lambda: InstrumentedAdam(
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.02, 3, 0.7),
        statistics="all",
        aggregation="layer",
        exclude="^out/bias",
    ),
}


def assert_same_statistics(got, want, where):
    assert (got.step, got.steps) == (want.step, want.steps), where
    assert got.keys() == want.keys(), where
    for key in want:
        a, b = got[key], want[key]
        np.testing.assert_allclose(
            [a.last, a.mean, a.max, a.total],
            [b.last, b.mean, b.max, b.total],
            rtol=1e-6,
            atol=1e-9,
            err_msg=f"{key} {where}",
        )
        assert a.first_nonfinite_step == b.first_nonfinite_step, (key, where)


@pytest.mark.parametrize("sequential", [False, True], ids=["functional", "sequential"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resumed_run_matches_uninterrupted_run(name, sequential, tmp_path):
    """Keras names a built `Sequential` model's variables `net/hidden/kernel`, but a reloaded
    one's `hidden/kernel`: the statistics' names and selections must not follow that change."""
    total = STEPS_BEFORE + STEPS_AFTER
    straight = make_model(OPTIMIZERS[name](), sequential)
    straight_reads = {}
    train(straight, 0, STEPS_BEFORE, straight_reads)
    pending = straight.optimizer.statistics(reset=False)  # steps 5 and 6, window still open
    train(straight, STEPS_BEFORE, total, straight_reads)

    first = make_model(OPTIMIZERS[name](), sequential)
    resumed_reads = {}
    train(first, 0, STEPS_BEFORE, resumed_reads)
    first.save(tmp_path / "m.keras")

    loaded = keras.models.load_model(tmp_path / "m.keras")
    optimizer = loaded.optimizer
    assert type(optimizer) is type(first.optimizer)
    assert optimizer.get_config() == first.optimizer.get_config()
    assert int(optimizer.iterations.numpy()) == STEPS_BEFORE
    for a, b in zip(loaded.get_weights(), first.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # The open window (steps since the read at step 4) was saved with the optimizer.
    assert_same_statistics(optimizer.statistics(reset=False), pending, "right after loading")

    train(loaded, STEPS_BEFORE, total, resumed_reads)
    assert int(optimizer.iterations.numpy()) == total
    assert int(straight.optimizer.iterations.numpy()) == total
    for a, b in zip(loaded.get_weights(), straight.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(optimizer.variables, straight.optimizer.variables, strict=True):
        np.testing.assert_allclose(
            np.asarray(a.numpy(), "float64"),
            np.asarray(b.numpy(), "float64"),
            rtol=1e-6,
            atol=1e-7,
            err_msg=a.path,
        )

    assert sorted(resumed_reads) == sorted(straight_reads) == [4, 8, 12]
    for step, want in straight_reads.items():
        assert_same_statistics(resumed_reads[step], want, f"read at step {step}")
    spanning = resumed_reads[8]
    assert spanning.steps == READ_EVERY and spanning.step == 8


def test_sequential_model_with_anchored_include_loads(tmp_path):
    """An `include` anchored on the names statistics report still selects after loading."""
    probe = InstrumentedAdam(statistics="all")
    probe.build(make_model(probe, sequential=True).trainable_variables)
    hidden = {group.rsplit("/", 1)[0] for _, group in probe.statistic_keys if group}
    (hidden,) = {group for group in hidden if group.endswith("hidden")}

    optimizer = InstrumentedAdam(
        learning_rate=0.01, statistics="all", include="^" + re.escape(hidden) + "/"
    )
    model = make_model(optimizer, sequential=True)
    train(model, 0, 2, {})
    keys = optimizer.statistic_keys
    assert {group for _, group in keys} == {f"{hidden}/kernel", f"{hidden}/bias", None}
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.optimizer.statistic_keys == keys
