"""Cost of logging in `model.fit`: optiscope's logger against Keras' TensorBoard callback.

Models as in `instrumentation_overhead.py` ("mlp", "cnn", "deep"; Adam, batch 32). Each timed
call is one `fit` of EPOCHS epochs (one tracked run, set-up and delivery included); calls are
timed in interleaved rounds and compared by their fastest rounds. Back ends are local: TensorBoard
event files and an MLflow SQLite store in a temporary directory.

    python benchmarks/logging_overhead.py [--models mlp cnn deep] [--rounds 3]
"""

import argparse
import os
import tempfile
import warnings

import _timing
import keras
import mlflow

from optiscope.callbacks import OptimizerStatsLogger
from optiscope.optimizers import InstrumentedAdam
from optiscope.tracking import MlflowSink, TensorBoardSink

EPOCHS = 3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=_timing.MODELS, default=_timing.MODELS)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="optiscope-bench-")
    uri = f"sqlite:///{work}/mlflow.db"
    mlflow.set_tracking_uri(uri)

    def default_logger():
        return [OptimizerStatsLogger(logdir=f"{work}/tb", tracking_uri=uri)]

    def one_sink(kind, statistics_interval=100):
        def callbacks():
            sink = (
                TensorBoardSink(logdir=f"{work}/tb")
                if kind == "tensorboard"
                else MlflowSink(tracking_uri=uri)
            )
            return [OptimizerStatsLogger(sinks=[sink], interval=statistics_interval)]

        return callbacks

    def every_10_steps():
        return [OptimizerStatsLogger(logdir=f"{work}/tb", tracking_uri=uri, interval=10)]

    def keras_tensorboard():
        return [keras.callbacks.TensorBoard(log_dir=f"{work}/keras", histogram_freq=1)]

    variants = {
        "no logging": (lambda: keras.optimizers.Adam(1e-3), lambda: []),
        "no logging, a second model (the noise floor)": (
            lambda: keras.optimizers.Adam(1e-3),
            lambda: [],
        ),
        "OptimizerStatsLogger() default: both sinks, every 100 steps": (
            lambda: InstrumentedAdam(1e-3),
            default_logger,
        ),
        "  the same, TensorBoard sink only": (
            lambda: InstrumentedAdam(1e-3),
            one_sink("tensorboard"),
        ),
        "  the same, MLflow sink only": (lambda: InstrumentedAdam(1e-3), one_sink("mlflow")),
        "all statistics, both sinks, every 10 steps": (
            lambda: InstrumentedAdam(1e-3, statistics="all"),
            every_10_steps,
        ),
        "keras TensorBoard(histogram_freq=1)": (
            lambda: keras.optimizers.Adam(1e-3),
            keras_tensorboard,
        ),
    }
    runs, series = {}, {}
    for kind in args.models:
        build, loss, x, y = _timing.workload(kind)
        for name, (make_optimizer, callbacks) in variants.items():
            model = build()
            model.compile(optimizer=make_optimizer(), loss=loss)

            def fit(model=model, callbacks=callbacks, x=x, y=y, key=(kind, name)):
                logged = callbacks()
                model.fit(x, y, batch_size=32, epochs=EPOCHS, verbose=0, callbacks=logged)
                if logged and isinstance(logged[0], OptimizerStatsLogger):
                    series[key] = len(model.optimizer.statistic_keys)
                elif logged:
                    series[key] = f"loss + {len(model.trainable_variables)} histograms"

            runs[kind, name] = fit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fit in runs.values():
            fit()  # trace and warm up
        times = _timing.interleaved(runs, args.rounds)

    print(f"# logging overhead in model.fit, {EPOCHS} epochs a call; {_timing.machine()}")
    for kind in args.models:
        base = times[kind, "no logging"]
        print(f"\n{kind}")
        print(f"{'variant':<62}{'s/epoch':>9}{'ratio':>8}  series")
        for (model, name), t in times.items():
            if model == kind:
                count = series.get((model, name), "-")
                print(f"{name:<62}{t / EPOCHS:>9.3f}{t / base:>7.3f}x  {count}")
    print(f"\n(work directory: {work})")
    os.environ.pop("MLFLOW_TRACKING_URI", None)


if __name__ == "__main__":
    main()
