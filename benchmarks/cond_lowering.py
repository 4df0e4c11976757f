"""Cost of the scheduled mode's conds: one `If` op each, against the Switch/Merge lowering.

On TensorFlow, `tf.cond` in a graph is normally lowered to a Switch and a Merge for every tensor
that enters or leaves it; the instrumentation keeps its conds as single `If` ops instead. This
script times both side by side on the deep MLP ("deep" in `instrumentation_overhead.py`, 102
variables, Adam, batch 32), with the logger's scheduled reads never due and every 100 steps.

    python benchmarks/cond_lowering.py [--models deep] [--rounds 7]
"""

import argparse

import _timing
import keras
from instrumentation_overhead import (
    BASELINE,
    NOISE_FLOOR,
    ScheduledNoReads,
    ScheduledReads,
    print_tables,
)
from keras import ops

from optiscope.optimizers import InstrumentedAdam, instrumentation


def variants():
    single, lowered = instrumentation._cond, ops.cond
    for name, callbacks in (
        ("scheduled, never read", ScheduledNoReads),
        ("scheduled every 100", lambda: ScheduledReads(100)),
    ):
        for cond_kind, cond in (("If ops", single), ("lowered", lowered)):
            yield f"{name}, {cond_kind}", InstrumentedAdam(1e-3), [callbacks()], cond


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=_timing.MODELS, default=["deep"])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    single = instrumentation._cond
    fits, steps = {}, {}
    for kind in args.models:
        build, loss, x, y = _timing.workload(kind)
        steps[kind] = len(x) // 32
        plain = [
            (name, keras.optimizers.Adam(1e-3), [], single) for name in (BASELINE, NOISE_FLOOR)
        ]
        for name, optimizer, callbacks, cond in [*plain, *variants()]:
            model = build()
            model.compile(optimizer=optimizer, loss=loss)

            def fit(model=model, x=x, y=y, callbacks=callbacks):
                model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks)

            instrumentation._cond = cond  # read while the first fit traces the step
            try:
                fit()
            finally:
                instrumentation._cond = single
            fits[kind, name] = fit
    times = _timing.interleaved(fits, args.rounds)

    print(f"# the instrumentation's conds, If ops against lowered; {_timing.machine()}")
    print_tables(times, steps)


if __name__ == "__main__":
    main()
