"""Cost of logging in `model.fit`: optiscope's logger against Keras' and MLflow's callbacks.

Every variant trains the same MLP on California-housing-shaped data (8 -> 64 -> 64 -> 1,
batch 32, 645 steps per epoch) with Adam; each timed call is one `fit` of EPOCHS epochs (one
tracked run, set-up and delivery included); calls are timed in interleaved rounds and compared
by their medians. Back ends are local: TensorBoard event files and an MLflow SQLite store in a
temporary directory.

    python benchmarks/logging_overhead.py [--rounds 5]
"""

import argparse
import os
import tempfile
import warnings

import _timing
import keras
import mlflow
import numpy as np

from optiscope.callbacks import OptimizerStatsLogger
from optiscope.optimizers import InstrumentedAdam
from optiscope.tracking import MlflowSink, TensorBoardSink

EPOCHS = 3


def build(optimizer):
    model = _timing.california_mlp()
    model.compile(optimizer=optimizer, loss="mse")
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="optiscope-bench-")
    uri = f"sqlite:///{work}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20640, 8)).astype("float32")
    y = rng.normal(size=(20640, 1)).astype("float32")

    def optiscope_logger(interval, name, mlflow_sink=True):
        def callbacks():
            sinks = [TensorBoardSink(logdir=f"{work}/tb", run_name=name)]
            if mlflow_sink:
                sinks.append(MlflowSink(tracking_uri=uri, run_name=name))
            return [OptimizerStatsLogger(sinks=sinks, interval=interval)]

        return callbacks

    def keras_tensorboard():
        return [
            keras.callbacks.TensorBoard(
                log_dir=f"{work}/keras", update_freq="batch", histogram_freq=1
            )
        ]

    def mlflow_callback():
        return [mlflow.keras.MlflowCallback(log_every_epoch=False, log_every_n_steps=1)]

    variants = {
        "no logging": (keras.optimizers.Adam(1e-3), lambda: []),
        "optiscope, all statistics, both sinks, every 100 steps (default)": (
            InstrumentedAdam(1e-3, statistics="all"),
            optiscope_logger(100, "i100"),
        ),
        "optiscope, all statistics, both sinks, every 10 steps": (
            InstrumentedAdam(1e-3, statistics="all"),
            optiscope_logger(10, "i10"),
        ),
        "optiscope, all statistics, TensorBoard only, every 10 steps": (
            InstrumentedAdam(1e-3, statistics="all"),
            optiscope_logger(10, "tb10", mlflow_sink=False),
        ),
        "optiscope, default statistics, both sinks, every 100 steps": (
            InstrumentedAdam(1e-3),
            optiscope_logger(100, "d100"),
        ),
        "keras TensorBoard(update_freq='batch', histogram_freq=1)": (
            keras.optimizers.Adam(1e-3),
            keras_tensorboard,
        ),
        "mlflow MlflowCallback(log_every_n_steps=1)": (
            keras.optimizers.Adam(1e-3),
            mlflow_callback,
        ),
    }
    models = {name: build(optimizer) for name, (optimizer, _) in variants.items()}
    series = {}

    def fit(name):
        callbacks = variants[name][1]()
        if name.startswith("mlflow"):
            with mlflow.start_run():
                models[name].fit(x, y, batch_size=32, epochs=EPOCHS, verbose=0, callbacks=callbacks)
        else:
            models[name].fit(x, y, batch_size=32, epochs=EPOCHS, verbose=0, callbacks=callbacks)
        if name.startswith("optiscope"):
            series[name] = len(models[name].optimizer.statistic_keys)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in variants:
            fit(name)  # trace and warm up
        times = _timing.interleaved({name: lambda n=name: fit(n) for name in variants}, args.rounds)

    base = times["no logging"]
    print(f"# logging overhead in model.fit; {_timing.machine()}")
    print(f"{'variant':<66}{'s/epoch':>9}{'ratio':>8}")
    for name, t in times.items():
        print(f"{name:<66}{t / EPOCHS:>9.3f}{t / base:>7.3f}x")
    for name, count in series.items():
        print(f"{name}: {count} statistic series per read")
    print(f"(work directory: {work})")
    os.environ.pop("MLFLOW_TRACKING_URI", None)


if __name__ == "__main__":
    main()
