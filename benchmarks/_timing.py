"""Side-by-side timing helpers: variants are measured in interleaved rounds, so that a
slow moment of the machine hits every variant alike, and compared by their fastest round (the
machine's noise only ever adds time: on a shared 2-core machine single rounds run up to 2x
slower, which moves medians of a few rounds by more than the effects measured). Each round runs
the variants in a new (seeded) order, so that no variant always follows the same neighbour."""

import os
import platform
import random
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def interleaved(variants, rounds, repeats=1):
    """`variants` maps name -> zero-argument callable. Returns name -> the fastest round's
    seconds/call."""
    samples = {name: [] for name in variants}
    order = list(variants)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            fn = variants[name]
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            samples[name].append((time.perf_counter() - start) / repeats)
    return {name: min(times) for name, times in samples.items()}


def machine():
    import keras

    if keras.backend.backend() == "jax":
        import jax

        backend = f"JAX {jax.__version__}"
    else:
        import tensorflow as tf

        backend = f"TensorFlow {tf.__version__}"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{backend}, Keras {keras.__version__}"
    )


def california_mlp():
    """The benchmarks' model: 8 -> 64 -> 64 -> 1 (ReLU), seeded, for California-shaped data."""
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(1),
        ]
    )


def small_cnn():
    """Two Conv2D + pooling blocks, Dense 64, Dense 10, on 28 x 28 x 1 inputs (8 variables)."""
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def dense_stack(layers, width=32, inputs=32):
    """`layers` Dense layers of `width` units (ReLU between them): 2 * `layers` variables."""
    import keras

    keras.utils.set_random_seed(0)
    stack = [keras.layers.Dense(width, activation="relu") for _ in range(layers - 1)]
    return keras.Sequential([keras.Input((inputs,)), *stack, keras.layers.Dense(width)])


def deep_mlp():
    """50 Dense layers of width 32 and a Dense(1) output: 102 variables."""
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((32,)),
            *[keras.layers.Dense(32, activation="relu") for _ in range(50)],
            keras.layers.Dense(1),
        ]
    )


def workload(kind):
    """`(build_model, loss, x, y)` of one of the benchmark models: "mlp" (8 -> 64 -> 64 -> 1,
    645 steps of 32), "cnn" (`small_cnn`, 200 steps) or "deep" (`deep_mlp`, 200 steps)."""
    import numpy as np

    rng = np.random.default_rng(0)
    if kind == "mlp":
        x = rng.normal(size=(20640, 8)).astype("float32")
        return california_mlp, "mse", x, rng.normal(size=(20640, 1)).astype("float32")
    if kind == "cnn":
        x = rng.normal(size=(6400, 28, 28, 1)).astype("float32")
        y = rng.integers(0, 10, size=(6400,))
        return small_cnn, keras_sparse_ce(), x, y
    if kind == "deep":
        x = rng.normal(size=(6400, 32)).astype("float32")
        return deep_mlp, "mse", x, rng.normal(size=(6400, 1)).astype("float32")
    raise ValueError(f"Argument `model` must be one of {MODELS}. Received: model={kind!r}")


MODELS = ("mlp", "cnn", "deep")


def keras_sparse_ce():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
