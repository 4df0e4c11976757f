"""How the statistics' cost grows with the number of variables and with their size.

Each model trains with Adam, batch 32, default `model.compile`; default statistics measured on
every step and never read, and with the logger's scheduled reads (every 100 steps), against the
uninstrumented Adam; epochs timed in interleaved rounds (the fastest of each).
Variables: 5, 50 and 200 Dense(32) layers (10, 100, 400 variables). Parameters: one Dense
layer of 10^4, 10^6 and 10^7 parameters (2 variables).

    python benchmarks/scaling.py [--rounds 5] [--models 10^6 10^7]

`--models` keeps the models whose name contains one of the given strings. On the large
variables TensorFlow's CPU allocator matters (see `update_rules.py`): run once more with
`TF_CPU_ALLOCATOR_USE_BFC=true` to see it.
"""

import argparse
import os

import _timing
import keras
import numpy as np
from instrumentation_overhead import ScheduledReads

from optiscope.optimizers import InstrumentedAdam

# name: (model builder, input width, output width, steps an epoch)
MODELS = {
    "10 variables (5 x Dense(32))": (lambda: _timing.dense_stack(5), 32, 32, 100),
    "100 variables (50 x Dense(32))": (lambda: _timing.dense_stack(50), 32, 32, 100),
    "400 variables (200 x Dense(32))": (lambda: _timing.dense_stack(200), 32, 32, 50),
    "10^4 parameters (Dense 99 -> 100)": (lambda: _timing.dense_stack(1, 100, 99), 99, 100, 100),
    "10^6 parameters (Dense 999 -> 1000)": (
        lambda: _timing.dense_stack(1, 1000, 999),
        999,
        1000,
        50,
    ),
    "10^7 parameters (Dense 999 -> 10000)": (
        lambda: _timing.dense_stack(1, 10000, 999),
        999,
        10000,
        20,
    ),
}


EVERY_STEP = "default statistics, every step measured, never read"
SCHEDULED = "default statistics, scheduled reads every 100 steps (the logger's mode)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", help="substrings of the model names to keep")
    args = parser.parse_args()
    models = {
        name: spec
        for name, spec in MODELS.items()
        if not args.models or any(part in name for part in args.models)
    }
    if not models:
        parser.error(f"--models matched none of: {', '.join(MODELS)}")
    rng = np.random.default_rng(0)
    fits, sizes = {}, {}
    for name, (build, inputs, outputs, steps) in models.items():
        x = rng.normal(size=(32 * steps, inputs)).astype("float32")
        y = rng.normal(size=(32 * steps, outputs)).astype("float32")
        for variant, optimizer, callbacks in (
            ("keras Adam", keras.optimizers.Adam(1e-3), []),
            (EVERY_STEP, InstrumentedAdam(1e-3), []),
            (SCHEDULED, InstrumentedAdam(1e-3), [ScheduledReads(100)]),
        ):
            model = build()
            model.compile(optimizer=optimizer, loss="mse")

            def fit(model=model, x=x, y=y, callbacks=callbacks):
                model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks)

            fit()  # trace and warm up
            fits[name, variant] = fit
            sizes[name] = (len(model.trainable_variables), model.count_params(), steps)
    times = _timing.interleaved(fits, args.rounds)

    print(f"# statistics overhead against model size; {_timing.machine()}")
    print(f"TF_CPU_ALLOCATOR_USE_BFC={os.environ.get('TF_CPU_ALLOCATOR_USE_BFC', '')}")
    header = f"{'model':<40}{'vars':>6}{'params':>11}{'Adam ms/step':>14}"
    print(f"{header}{'every step: +ms':>17}{'ratio':>8}{'scheduled: +ms':>16}{'ratio':>8}")
    for name, (variables, parameters, steps) in sizes.items():
        base = times[name, "keras Adam"]
        every, scheduled = times[name, EVERY_STEP], times[name, SCHEDULED]
        print(
            f"{name:<40}{variables:>6}{parameters:>11,}{base / steps * 1e3:>14.3f}"
            f"{(every - base) / steps * 1e3:>17.3f}{every / base:>7.3f}x"
            f"{(scheduled - base) / steps * 1e3:>16.3f}{scheduled / base:>7.3f}x"
        )


if __name__ == "__main__":
    main()
