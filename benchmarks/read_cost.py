"""The cost of one `optimizer.statistics()` read, outside `fit`, on the benchmarks' models.

Each model is trained for a few steps with `InstrumentedAdam`, then read in a tight loop. The
current read (the state fetched with one read op, the marks moved with one assign op) is timed
side by side with the read it replaced: one `tf.function` that reads the state and moves the
marks, then the same host-side work. TensorFlow backend.

    python benchmarks/read_cost.py [--models mlp cnn deep] [--reads 2000] [--rounds 5]
"""

import argparse
import time

import _timing
import tensorflow as tf
from keras import ops

from optiscope.optimizers import InstrumentedAdam


def graph_call_read(optimizer):
    """The former read: one graph call returning state and marks (marks moved to now)."""
    plan = optimizer._optiscope
    layout = plan.layout

    @tf.function
    def read(advance):
        state, marks = ops.copy(plan.state), ops.copy(plan.marks)
        now = layout.state(state)
        current = layout.pack_marks(
            total=now.total, nonfinite=now.nonfinite, count=now.count, requested=now.window + 1.0
        )
        optimizer.assign(plan.marks, ops.where(advance, current, marks))
        return ops.concatenate([state, marks])

    advance = tf.constant(True)
    return lambda: read(advance).numpy()


def per_call(fn, calls):
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=_timing.MODELS, default=_timing.MODELS)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"# one statistics() read, us; {_timing.machine()}")
    print(f"{'model':<6}{'statistics':<12}{'entries':>8}{'graph call':>12}{'now':>9}{'ratio':>8}")
    for kind in args.models:
        build, loss, x, y = _timing.workload(kind)
        for statistics in ("default", "all"):
            model = build()
            optimizer = InstrumentedAdam(1e-3, statistics=statistics)
            model.compile(optimizer=optimizer, loss=loss)
            model.fit(x[:320], y[:320], batch_size=32, verbose=0)
            variants = {"graph call": graph_call_read(optimizer), "now": optimizer.statistics}
            best = {name: float("inf") for name in variants}
            for _ in range(args.rounds):  # interleaved; the fastest round of each
                for name, fn in variants.items():
                    best[name] = min(best[name], per_call(fn, args.reads))
            before, now = best["graph call"] * 1e6, best["now"] * 1e6
            entries = len(optimizer.statistic_keys)
            print(f"{kind:<6}{statistics:<12}{entries:>8}{before:>12.1f}{now:>9.1f}"
                  f"{now / before:>7.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
