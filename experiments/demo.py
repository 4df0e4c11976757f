"""The quick start as a job: train a small regression model with three instrumented
optimizers, stream their statistics to TensorBoard (./runs/demo) and MLflow (its local default
store), and print what happened inside each optimizer."""

import numpy as np

EXPERIMENT = "optiscope-demo"


def california_shaped(rows=20640, features=8, seed=42):
    """Synthetic regression data with the California housing shape (no download needed)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype("float32")
    w = rng.normal(size=(features, 1)).astype("float32")
    y = np.tanh(x @ w) + 0.1 * rng.normal(size=(rows, 1)).astype("float32")
    return x, y


def run(epochs=3, seed=42, logdir="runs", tracking_uri=None):
    """Returns `{optimizer name: (final loss, Statistics of the last epoch)}`."""
    import keras

    from optiscope.callbacks import OptimizerStatsLogger
    from optiscope.optimizers import InstrumentedAdam, InstrumentedSGD, SignAveraging
    from optiscope.tracking import naming

    x, y = california_shaped(seed=seed)
    optimizers = {
        "SignAveraging": lambda: SignAveraging(learning_rate=0.001, statistics="all"),
        "SGD-momentum": lambda: InstrumentedSGD(0.01, momentum=0.9, statistics="all"),
        "Adam": lambda: InstrumentedAdam(0.001, statistics="all"),
    }
    results = {}
    for name, make in optimizers.items():
        keras.utils.set_random_seed(seed)
        model = keras.Sequential(
            [
                keras.Input((x.shape[1],)),
                keras.layers.Dense(32, activation="relu", name="hidden"),
                keras.layers.Dense(1, name="output"),
            ],
            name="regression",
        )
        optimizer = make()
        model.compile(optimizer=optimizer, loss="mse", steps_per_execution=8)
        logger = OptimizerStatsLogger(
            logdir=logdir,
            run_name=f"demo/{naming.run_name(name)}",
            tracking_uri=tracking_uri,
            experiment_name=EXPERIMENT,
            histograms=True,  # the slots' distributions
            compact=True,  # and each statistic across variables: histograms, heat-maps
            params={"data": f"synthetic California-shaped regression, {len(x)} x {x.shape[1]}"},
        )
        history = model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, callbacks=[logger])
        results[name] = (history.history["loss"][-1], optimizer.statistics(reset=False))
    return results


def main(epochs=3, logdir="runs"):
    for name, (loss, stats) in run(epochs, logdir=logdir).items():
        print(f"\n{name}: final loss {loss:.4f} after {stats.step} steps")
        print(f"  {'statistic':<24}{'variable':<20}{'last':>12}{'mean':>12}")
        for (statistic, group), s in stats.items():
            values = f"{s.last:>12.4g}{s.total / stats.step:>12.4g}"  # mean over all steps
            print(f"  {statistic:<24}{group or '-':<20}{values}")
    print(
        f"\nTensorBoard logs are in ./{logdir}, MLflow runs in experiment {EXPERIMENT!r} of the "
        "local store.\nOpen both with:  optiscope ui   (or .venv/bin/optiscope ui)"
    )
