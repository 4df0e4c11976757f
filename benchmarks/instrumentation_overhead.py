"""Instrumentation overhead in `model.fit`: an MLP on California-housing-shaped data.

Every variant trains the same model (8 -> 64 -> 64 -> 1, batch 32, 645 steps per epoch) with
Adam; they differ only in instrumentation and in how often a callback reads the statistics.
Epochs are timed in interleaved rounds and compared by their medians.

    python benchmarks/instrumentation_overhead.py [--rounds 7] [--steps-per-execution 1]
        [--jit-compile]
"""

import argparse

import _timing
import keras
import numpy as np

from optiscope.optimizers import InstrumentedAdam


class ReadEvery(keras.callbacks.Callback):
    """Reads the optimizer's statistics every `interval` steps (one transfer per read), from
    Keras' callback thread like `OptimizerStatsLogger` (reads are consistent there)."""

    async_safe = True

    def __init__(self, interval):
        super().__init__()
        self.interval = interval
        self.reads = 0

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.interval == 0:
            self.model.optimizer.statistics()
            self.reads += 1


def make_fit(optimizer, callbacks, data, steps_per_execution, jit_compile):
    x, y = data
    model = _timing.california_mlp()
    model.compile(
        optimizer=optimizer,
        loss="mse",
        steps_per_execution=steps_per_execution,
        jit_compile=jit_compile,
    )
    fit = lambda: model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks)  # noqa: E731
    fit()  # trace and warm up
    return fit


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-execution", type=int, default=1)
    parser.add_argument("--jit-compile", action="store_true", help="compile steps with XLA")
    args = parser.parse_args()
    spe = args.steps_per_execution
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(20640, 8)).astype("float32"), rng.normal(size=(20640, 1)))

    variants = {
        "keras Adam, uninstrumented": (keras.optimizers.Adam(1e-3), []),
        "InstrumentedAdam(statistics=None)": (InstrumentedAdam(1e-3, statistics=None), []),
        "default statistics, read every 100 steps": (InstrumentedAdam(1e-3), [ReadEvery(100)]),
        "default statistics, read every 10 steps": (InstrumentedAdam(1e-3), [ReadEvery(10)]),
        "default statistics, read every step": (InstrumentedAdam(1e-3), [ReadEvery(1)]),
        "default statistics, never read": (InstrumentedAdam(1e-3), []),
        "all statistics, read every step": (
            InstrumentedAdam(1e-3, statistics="all"),
            [ReadEvery(1)],
        ),
        "all statistics, read every 100 steps": (
            InstrumentedAdam(1e-3, statistics="all"),
            [ReadEvery(100)],
        ),
    }
    fits = {
        name: make_fit(opt, cbs, data, spe, args.jit_compile)
        for name, (opt, cbs) in variants.items()
    }
    times = _timing.interleaved(fits, args.rounds)

    base = times["keras Adam, uninstrumented"]
    print(
        f"# instrumentation overhead in model.fit, steps_per_execution={spe}, "
        f"jit_compile={args.jit_compile}; {_timing.machine()}"
    )
    print(f"{'variant':<44}{'s/epoch':>9}{'ms/step':>9}{'ratio':>8}")
    for name, t in times.items():
        print(f"{name:<44}{t:>9.3f}{t / 645 * 1e3:>9.3f}{t / base:>7.3f}x")


if __name__ == "__main__":
    main()
