"""The library's optimizers keep working with the Keras base-class features under
`model.fit`: clipping, schedules, EMA, gradient accumulation, loss scaling,
weight decay, mixed precision, sparse (Embedding) gradients and `.keras` files."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import reference as R

from optiscope.optimizers import (
    AddSign,
    EMAMomentum,
    LinearSignDecay,
    PowerSign,
    RestartSignDecay,
    SignAveraging,
    unwrap,
)

# name -> (class, reference rule, hyperparameters other than the learning rate)
OPTIMIZERS = {
    "SignAveraging": (SignAveraging, "sign_averaging", {}),
    "PowerSign": (PowerSign, "power_sign", {"beta": 0.5, "sign_decay": "linear"}),
    "AddSign": (AddSign, "add_sign", {"alpha": 0.5, "beta": 0.75}),
    "EMAMomentum": (EMAMomentum, "ema_momentum", {"momentum": 0.5, "bias_correction": True}),
}
LR = 0.0625


def make_optimizer(name, learning_rate=LR, **kwargs):
    cls, _, hyper = OPTIMIZERS[name]
    hyper = dict(hyper)
    if hyper.get("sign_decay") == "linear":
        hyper["sign_decay"] = LinearSignDecay(decay_steps=3)
    return cls(learning_rate=learning_rate, **hyper, **kwargs)


def make_reference(name, learning_rate=LR):
    _, rule, hyper = OPTIMIZERS[name]
    hyper = dict(hyper)
    if hyper.get("sign_decay") == "linear":
        hyper["sign_decay"] = functools.partial(R.linear_sign_decay, decay_steps=3)
    return R.ReferenceOptimizer(rule, "float32", learning_rate=learning_rate, **hyper)


# ------------------------------------------------------------------ a linear model and its maths
_rng = np.random.default_rng(0)
X = _rng.normal(size=(8, 3)).astype("float32")
Y = (X @ np.array([[1.0], [-2.0], [3.0]]) + 5.0).astype(
    "float32"
)  # large residuals: clipping bites
KERNEL0 = np.array([[0.1], [0.2], [-0.1]], "float32")
BIAS0 = np.array([0.0], "float32")
BATCH_SIZE = 4  # two steps per epoch
EPOCHS = 2


def linear_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.set_weights([KERNEL0, BIAS0])
    return model


def mse_gradients(weights, x, y):
    """Gradients of Keras' "mse" (mean over the batch) for `Dense(1)`, in float64."""
    kernel, bias = (np.asarray(w, np.float64) for w in weights)
    residual = x @ kernel + bias - y
    return [2.0 / len(x) * x.T @ residual, 2.0 / len(x) * residual.sum(axis=0)]


def clip_by_norm(limit, grads):
    return [g * limit / max(np.linalg.norm(g), limit) for g in grads]


def clip_by_value(limit, grads):
    return [np.clip(g, -limit, limit) for g in grads]


def clip_by_global_norm(limit, grads):
    norm = np.sqrt(sum(np.sum(g**2) for g in grads))
    return [g * limit / max(norm, limit) for g in grads]


def simulate(
    reference,
    *,
    clip=None,
    accumulation=1,
    ema_momentum=None,
    weight_decay=None,
    epochs=EPOCHS,
):
    """What `model.fit(X, Y, batch_size=BATCH_SIZE, shuffle=False)` should do, step by step,
    following the Keras base optimizer: mean of accumulated gradients, then clipping, then
    decoupled weight decay, then the rule, then the moving average. Returns the weights after
    each batch (the EMA replaces the last ones, as `fit` does when it finishes)."""
    weights = [KERNEL0, BIAS0]
    average = None
    pending = []
    history = []
    for _ in range(epochs):
        for start in range(0, len(X), BATCH_SIZE):
            batch = slice(start, start + BATCH_SIZE)
            pending.append(mse_gradients(weights, X[batch], Y[batch]))
            if len(pending) == accumulation:
                grads = [sum(gs) / accumulation for gs in zip(*pending, strict=True)]
                pending = []
                if clip is not None:
                    grads = clip(grads)
                grads = [g.astype("float32") for g in grads]
                if weight_decay is not None:
                    lr = reference.hyper["learning_rate"]
                    lr = lr(reference.t) if callable(lr) else lr
                    weights = [(w - w * np.float32(weight_decay * lr)) for w in weights]
                weights = reference.apply(grads, weights)
                if ema_momentum is not None:
                    average = (
                        list(weights)
                        if average is None
                        else [
                            ema_momentum * a + (1 - ema_momentum) * w
                            for a, w in zip(average, weights, strict=True)
                        ]
                    )
            history.append([np.array(w) for w in weights])
    if average is not None:
        history[-1] = average
    return history


class WeightRecorder(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights = []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append([w.numpy() for w in self.model.trainable_weights])


def fit(model, optimizer, epochs=EPOCHS):
    model.compile(optimizer=optimizer, loss="mse")
    recorder = WeightRecorder()
    history = model.fit(
        X, Y, batch_size=BATCH_SIZE, epochs=epochs, shuffle=False, verbose=0, callbacks=[recorder]
    )
    assert np.isfinite(history.history["loss"]).all()
    return recorder.weights


def assert_weights_close(actual, expected, message=""):
    # The fused float32 gradient of `fit` and the float64 NumPy one differ by a few float32
    # ulps; they pass through up to four steps of the rule.
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6, err_msg=message)


# ------------------------------------------------------------------ features, checked numerically
FEATURES = {
    "none": ({}, {}),
    "clipnorm": ({"clipnorm": 1.0}, {"clip": functools.partial(clip_by_norm, 1.0)}),
    "clipvalue": ({"clipvalue": 0.5}, {"clip": functools.partial(clip_by_value, 0.5)}),
    "global_clipnorm": (
        {"global_clipnorm": 1.0},
        {"clip": functools.partial(clip_by_global_norm, 1.0)},
    ),
    "loss_scale_factor": ({"loss_scale_factor": 64.0}, {}),
    "weight_decay": ({"weight_decay": 0.5}, {"weight_decay": 0.5}),
    "use_ema": ({"use_ema": True, "ema_momentum": 0.5}, {"ema_momentum": 0.5}),
    "gradient_accumulation_steps": ({"gradient_accumulation_steps": 2}, {"accumulation": 2}),
}


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fit_with_feature_matches_reference(name, feature):
    optimizer_kwargs, simulate_kwargs = FEATURES[feature]
    optimizer = make_optimizer(name, **optimizer_kwargs)
    model = linear_model()
    recorded = fit(model, optimizer)
    expected = simulate(make_reference(name), **simulate_kwargs)
    assert len(recorded) == len(expected) == EPOCHS * len(X) // BATCH_SIZE
    for step, (actual, wanted) in enumerate(zip(recorded, expected, strict=True)):
        if feature == "use_ema" and step == len(expected) - 1:
            continue  # the callback sees the raw weights; `fit` swaps in the EMA afterwards
        assert_weights_close(actual, wanted, f"{name} {feature} after batch {step}")
    assert_weights_close(model.get_weights(), expected[-1], f"{name} {feature} after fit")
    assert not np.allclose(model.get_weights()[0], KERNEL0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_gradient_accumulation_changes_variables_every_second_step(name):
    optimizer = make_optimizer(name, gradient_accumulation_steps=2)
    recorded = fit(linear_model(), optimizer)
    before = [KERNEL0, BIAS0]
    for step, weights in enumerate(recorded):
        changed = any(not np.array_equal(w, b) for w, b in zip(weights, before, strict=True))
        assert changed == (step % 2 == 1), f"step {step}"
        before = weights
    assert int(optimizer.iterations) == len(recorded) // 2


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fit_with_learning_rate_schedule(name):
    schedule = keras.optimizers.schedules.ExponentialDecay(
        LR, decay_steps=1, decay_rate=0.5, staircase=False
    )
    model = linear_model()
    recorded = fit(model, make_optimizer(name, learning_rate=schedule))
    expected = simulate(make_reference(name, learning_rate=lambda t: LR * 0.5**t))
    for step, (actual, wanted) in enumerate(zip(recorded, expected, strict=True)):
        assert_weights_close(actual, wanted, f"{name} schedule after batch {step}")
    assert float(model.optimizer.learning_rate) == pytest.approx(LR * 0.5 ** len(recorded))


# ------------------------------------------------------------------ mixed precision


def fit_mixed_precision(optimizer):
    keras.utils.set_random_seed(42)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)]
    )
    initial = [w.numpy() for w in model.trainable_weights]
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(X, Y / 10, batch_size=BATCH_SIZE, epochs=2, shuffle=False, verbose=0)
    return model, initial, history


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_mixed_precision(name, mixed_float16):
    optimizer = make_optimizer(name)
    model, initial, history = fit_mixed_precision(optimizer)
    sgd = keras.optimizers.SGD(LR)
    fit_mixed_precision(sgd)

    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert unwrap(model.optimizer) is optimizer
    # The loss scale skips the steps whose scaled gradients overflow, as for Keras' own SGD on
    # the same model and data (the first, at the initial scale, on some backends).
    assert int(optimizer.iterations) == int(sgd.iterations) >= 3
    assert np.isfinite(history.history["loss"]).all()
    for variable, before in zip(model.trainable_weights, initial, strict=True):
        assert variable.dtype == "float32"
        assert np.isfinite(variable.numpy()).all()
        assert not np.array_equal(variable.numpy(), before)
    for variable in optimizer.variables:
        assert variable.dtype in ("float32", "float64", "int32", "int64")
        assert np.isfinite(variable.numpy()).all()


# ------------------------------------------------------------------ sparse gradients
@pytest.mark.tensorflow_only
def test_embedding_gradients_are_sparse():
    """The premise of the sparse tests: `Embedding` gives a `tf.IndexedSlices` gradient."""
    import tensorflow as tf

    layer = keras.layers.Embedding(10, 3)
    layer.build((None, 2))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(np.array([[1, 2]])))
    (gradient,) = tape.gradient(loss, [layer.embeddings.value])
    assert isinstance(gradient, tf.IndexedSlices)


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sparse_gradient_is_the_densified_gradient(name):
    """Documented: sparse gradients are densified; rows absent from the batch get a zero
    gradient and duplicate indices are summed."""
    import tensorflow as tf

    initial = np.arange(12, dtype="float32").reshape(6, 2) / 4 - 1.0
    steps = [
        ([0, 2, 2], [[1.0, -2.0], [0.5, 0.5], [0.25, 1.0]]),
        ([1, 3], [[-1.0, 1.0], [2.0, -3.0]]),
        ([0, 2], [[-2.0, 1.0], [-1.0, -1.0]]),
    ]
    sparse_var = keras.Variable(initial)
    dense_var = keras.Variable(initial)
    sparse_opt, dense_opt = make_optimizer(name), make_optimizer(name)
    reference = make_reference(name)
    expected = initial
    for t, (indices, values) in enumerate(steps):
        values = np.array(values, "float32")
        dense = np.zeros_like(initial)
        np.add.at(dense, indices, values)
        sparse = tf.IndexedSlices(
            tf.constant(values), tf.constant(indices, "int64"), tf.constant([6, 2], "int64")
        )
        before = sparse_var.numpy()
        sparse_opt.apply([sparse], [sparse_var])
        dense_opt.apply([dense], [dense_var])
        (expected,) = reference.apply([dense], [expected])
        np.testing.assert_array_equal(sparse_var.numpy(), dense_var.numpy(), err_msg=f"step {t}")
        np.testing.assert_allclose(
            sparse_var.numpy(),
            expected,
            rtol=1e-6,
            atol=1e-6 * np.max(np.abs(expected)),  # an element may cancel to near zero
            err_msg=f"step {t}",
        )
        untouched = sorted(set(range(6)) - set(indices))
        if name == "EMAMomentum" and t > 0:
            # Densified momentum keeps moving rows that had a gradient before.
            moved = [r for r in untouched if np.any(reference.state[0][0][r] != 0)]
            assert moved
            assert not np.array_equal(sparse_var.numpy()[moved], before[moved])
        else:
            np.testing.assert_array_equal(sparse_var.numpy()[untouched], before[untouched])
    np.testing.assert_array_equal(sparse_var.numpy()[4:], initial[4:])  # never in a batch


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_embedding_model_trains_and_leaves_unused_rows_alone(name, keras_seed):
    model = keras.Sequential(
        [
            keras.Input((2,), dtype="int32"),
            keras.layers.Embedding(10, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    tokens = np.random.default_rng(1).integers(0, 5, size=(16, 2)).astype("int32")  # rows 0-4
    targets = np.sum(tokens, axis=1, keepdims=True).astype("float32")
    table = model.layers[0].embeddings
    initial = table.numpy()
    model.compile(optimizer=make_optimizer(name), loss="mse")
    history = model.fit(tokens, targets, batch_size=8, epochs=3, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]
    trained = table.numpy()
    used = np.unique(tokens)
    assert not np.allclose(trained[used], initial[used])
    np.testing.assert_array_equal(trained[5:], initial[5:])


# ------------------------------------------------------------------ .keras files
SAVE_CASES = {
    "SignAveraging": lambda: SignAveraging(learning_rate=0.01),
    "PowerSign": lambda: PowerSign(
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.01, 2, 0.9),
        base=2.0,
        sign_decay=LinearSignDecay(decay_steps=20),
        clipnorm=1.0,
    ),
    "AddSign": lambda: AddSign(
        learning_rate=0.01,
        alpha=0.5,
        sign_decay=RestartSignDecay(decay_steps=20, num_periods=2),
        statistics=["grad_norm", "sign_agreement"],
    ),
    "EMAMomentum": lambda: EMAMomentum(learning_rate=0.01, momentum=0.8, bias_correction=True),
}

_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import keras
    import numpy as np

    import optiscope.optimizers  # noqa: F401  (registers the optimizers; nothing else)

    folder = Path(sys.argv[1])
    x, y = np.load(folder / "x.npy"), np.load(folder / "y.npy")
    results = {}
    for path in sorted(folder.glob("*.keras")):
        model = keras.models.load_model(path)
        optimizer = model.optimizer
        result = {
            "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "predictions": model.predict(x, verbose=0).tolist(),
            "config": optimizer.get_config(),
            "variables": [v.numpy().tolist() for v in optimizer.variables],
        }
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        result["weights_after_more_training"] = [w.tolist() for w in model.get_weights()]
        results[path.stem] = result
    (folder / "loaded.json").write_text(json.dumps(results))
    """
)


def _tiny_model():
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    )


@pytest.fixture(scope="module")
def saved_and_reloaded(tmp_path_factory):
    """Trains and saves one model per optimizer, then loads them all in one fresh Python
    process that imports only `optiscope.optimizers` (no `custom_objects`)."""
    folder = tmp_path_factory.mktemp("keras_files")
    np.save(folder / "x.npy", X)
    np.save(folder / "y.npy", Y)
    here = {}
    for name, make in SAVE_CASES.items():
        keras.utils.set_random_seed(7)
        model = _tiny_model()
        optimizer = make()
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(X, Y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        model.save(folder / f"{name}.keras")
        here[name] = {
            "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "predictions": model.predict(X, verbose=0),
            "config": json.loads(json.dumps(optimizer.get_config())),
            "variables": [v.numpy() for v in optimizer.variables],
        }
        model.fit(X, Y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        here[name]["weights_after_more_training"] = model.get_weights()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    completed = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(folder)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    loaded = json.loads((folder / "loaded.json").read_text())
    return here, loaded


@pytest.mark.parametrize("name", SAVE_CASES)
def test_keras_file_round_trip_in_fresh_process(name, saved_and_reloaded):
    here, loaded = saved_and_reloaded
    ours, theirs = here[name], loaded[name]
    assert theirs["class"] == ours["class"]
    assert ours["class"].startswith("optiscope.optimizers.")
    assert theirs["config"] == ours["config"]
    np.testing.assert_array_equal(np.array(theirs["predictions"], "float32"), ours["predictions"])
    # Slots, step counter and statistics state, in order (paths differ: layer names are
    # numbered per process).
    assert len(theirs["variables"]) == len(ours["variables"])
    for i, value in enumerate(ours["variables"]):
        np.testing.assert_array_equal(np.array(theirs["variables"][i]), value, err_msg=str(i))
    # Training resumes from the restored slots and step, as if never saved.
    for a, b in zip(
        theirs["weights_after_more_training"], ours["weights_after_more_training"], strict=True
    ):
        np.testing.assert_allclose(np.array(a, "float32"), b, rtol=1e-6, atol=1e-7)
