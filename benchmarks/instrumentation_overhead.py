"""Instrumentation overhead in `model.fit` on three model shapes.

Models (batch 32, Adam, default `model.compile`): "mlp" 8 -> 64 -> 64 -> 1 (645 steps an epoch),
"cnn" two Conv2D + pooling blocks, Dense 64, Dense 10 on 28 x 28 x 1 (200 steps), "deep" 50
Dense(32) layers (102 variables, 200 steps). Variants of one model differ only in
instrumentation and in how often a callback reads the statistics. Epochs are timed in
interleaved rounds and compared by their fastest rounds with the uninstrumented Keras Adam; a
second uninstrumented model, timed like the others, shows the run's noise floor (always run).

    python benchmarks/instrumentation_overhead.py [--models mlp cnn deep] [--rounds 7]
        [--steps-per-execution 1] [--jit-compile] [--variants NAME ...]
"""

import argparse

import _timing
import keras

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


class ScheduledReads(ReadEvery):
    """Like `ReadEvery`, but schedules its reads first, as `OptimizerStatsLogger` does: only
    the steps it reads (and steps with a non-finite gradient) are measured."""

    def on_train_begin(self, logs=None):
        self.model.optimizer.schedule_reads(self, every=self.interval)


class ScheduledNoReads(keras.callbacks.Callback):
    """Schedules no read at all: only the gradients' finiteness check runs every step."""

    def on_train_begin(self, logs=None):
        self.model.optimizer.schedule_reads(self)


def make_fit(kind, optimizer, callbacks, steps_per_execution, jit_compile):
    build, loss, x, y = _timing.workload(kind)
    model = build()
    model.compile(
        optimizer=optimizer,
        loss=loss,
        steps_per_execution=steps_per_execution,
        jit_compile=jit_compile,
    )
    fit = lambda: model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks)  # noqa: E731
    fit()  # trace and warm up
    return fit, len(x) // 32


BASELINE = "keras Adam, uninstrumented"
NOISE_FLOOR = "keras Adam, uninstrumented, a second model"


def variants():
    return {
        BASELINE: (keras.optimizers.Adam(1e-3), []),
        NOISE_FLOOR: (keras.optimizers.Adam(1e-3), []),
        "InstrumentedAdam(statistics=None)": (InstrumentedAdam(1e-3, statistics=None), []),
        "default statistics, never read": (InstrumentedAdam(1e-3), []),
        "default statistics, read every 100 steps": (InstrumentedAdam(1e-3), [ReadEvery(100)]),
        "default statistics, read every step": (InstrumentedAdam(1e-3), [ReadEvery(1)]),
        "default statistics, scheduled, never read": (
            InstrumentedAdam(1e-3),
            [ScheduledNoReads()],
        ),
        "default statistics, scheduled every 100": (
            InstrumentedAdam(1e-3),
            [ScheduledReads(100)],
        ),
        "all statistics, read every 100 steps": (
            InstrumentedAdam(1e-3, statistics="all"),
            [ReadEvery(100)],
        ),
        "all statistics, read every step": (
            InstrumentedAdam(1e-3, statistics="all"),
            [ReadEvery(1)],
        ),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=_timing.MODELS, default=_timing.MODELS)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-execution", type=int, default=1)
    parser.add_argument("--jit-compile", action="store_true", help="compile steps with XLA")
    parser.add_argument("--variants", nargs="+", help="only these variants (and the baseline)")
    args = parser.parse_args()
    spe = args.steps_per_execution
    fits, steps = {}, {}
    for kind in args.models:
        for name, (optimizer, callbacks) in variants().items():
            if args.variants and name not in (*args.variants, BASELINE, NOISE_FLOOR):
                continue
            fits[kind, name], steps[kind] = make_fit(
                kind, optimizer, callbacks, spe, args.jit_compile
            )
    times = _timing.interleaved(fits, args.rounds)

    print(
        f"# instrumentation overhead in model.fit, steps_per_execution={spe}, "
        f"jit_compile={args.jit_compile}; {_timing.machine()}"
    )
    print_tables(times, steps)


def print_tables(times, steps):
    """One table a model: each variant's epoch, step and ratio to the uninstrumented Adam."""
    for kind in steps:
        base = times[kind, BASELINE]
        print(f"\n{kind}: {steps[kind]} steps an epoch")
        print(f"{'variant':<44}{'s/epoch':>9}{'ms/step':>9}{'ratio':>8}")
        for (model, name), t in times.items():
            if model == kind:
                print(f"{name:<44}{t:>9.3f}{t / steps[kind] * 1e3:>9.3f}{t / base:>7.3f}x")


if __name__ == "__main__":
    main()
