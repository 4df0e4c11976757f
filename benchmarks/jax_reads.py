"""Cost of reading statistics in `model.fit` on the JAX backend.

Keras' JAX trainer keeps the live state outside the model during an epoch; a read first syncs it
back (`model.jax_state_sync()`), and the step after it takes the state from the model again.
Every variant trains the same MLP on California-housing-shaped data (8 -> 64 -> 64 -> 1, batch
32, 645 steps per epoch) with Adam; each timed call is one epoch of `fit`, timed in interleaved
rounds and compared by their fastest rounds. The logger sends to a sink that keeps nothing, so
the figures are the reads' cost; "sync every step" is what a callback touching `self.model`
after every batch costs (Keras syncs on that access).

    python benchmarks/jax_reads.py [--rounds 5]
"""

import argparse
import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("JAX_ENABLE_X64", "1")  # the statistics' state is float64

import _timing  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from optiscope.callbacks import OptimizerStatsLogger  # noqa: E402
from optiscope.optimizers import InstrumentedAdam  # noqa: E402
from optiscope.tracking import NullSink  # noqa: E402

STEPS = 645


class SyncEveryStep(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        self.model.jax_state_sync()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * 32, 8)).astype("float32")
    y = rng.normal(size=(STEPS * 32, 1)).astype("float32")

    def logger(interval):
        return lambda: [OptimizerStatsLogger(sinks=NullSink(), interval=interval)]

    variants = {
        "Keras Adam, no callback": (keras.optimizers.Adam, lambda: []),
        "InstrumentedAdam, no logger": (InstrumentedAdam, lambda: []),
        "InstrumentedAdam, logger every 100 steps (default)": (InstrumentedAdam, logger(100)),
        "InstrumentedAdam, logger every 10 steps": (InstrumentedAdam, logger(10)),
        "InstrumentedAdam, logger every step": (InstrumentedAdam, logger(1)),
        "InstrumentedAdam, sync every step, no read": (
            InstrumentedAdam,
            lambda: [SyncEveryStep()],
        ),
    }
    models = {}
    for name, (optimizer_class, _) in variants.items():
        models[name] = _timing.california_mlp()
        models[name].compile(optimizer=optimizer_class(1e-3), loss="mse")

    def fit(name):
        callbacks = variants[name][1]()
        models[name].fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks)

    for name in variants:
        fit(name)  # compile and warm up
    times = _timing.interleaved({name: lambda n=name: fit(n) for name in variants}, args.rounds)

    base = times["InstrumentedAdam, no logger"]
    print(f"# reads in model.fit on JAX; {_timing.machine()}")
    print(f"{'variant':<52}{'ms/step':>9}{'ratio':>8}")
    for name, t in times.items():
        print(f"{name:<52}{1e3 * t / STEPS:>9.3f}{t / base:>7.3f}x")
    every = times["InstrumentedAdam, logger every step"]
    print(f"one read (sync, transfer, log): {1e3 * (every - base) / STEPS:.3f} ms")


if __name__ == "__main__":
    main()
