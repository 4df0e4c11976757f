"""Side-by-side timing helpers: variants are measured in interleaved rounds, so that a
slow moment of the machine hits every variant alike, and compared by their medians."""

import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def interleaved(variants, rounds, repeats=1):
    """`variants` maps name -> zero-argument callable. Returns name -> median seconds/call."""
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            samples[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(times) for name, times in samples.items()}


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
