"""The quick start as a job: train a small regression model with three instrumented
optimizers and print what happened inside each optimizer."""

import numpy as np


def california_shaped(rows=20640, features=8, seed=42):
    """Synthetic regression data with the California housing shape (no download needed)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype("float32")
    w = rng.normal(size=(features, 1)).astype("float32")
    y = np.tanh(x @ w) + 0.1 * rng.normal(size=(rows, 1)).astype("float32")
    return x, y


def run(epochs=3, seed=42):
    """Returns `{optimizer name: Statistics}` read once per epoch, the last epoch's."""
    import keras

    from optiscope.optimizers import InstrumentedAdam, InstrumentedSGD, SignAveraging

    x, y = california_shaped(seed=seed)
    optimizers = {
        "SignAveraging": lambda: SignAveraging(learning_rate=0.001, aggregation="layer"),
        "SGD(momentum=0.9)": lambda: InstrumentedSGD(0.01, momentum=0.9, aggregation="layer"),
        "Adam": lambda: InstrumentedAdam(0.001, aggregation="layer"),
    }
    results = {}
    for name, make in optimizers.items():
        keras.utils.set_random_seed(seed)
        model = keras.Sequential(
            [
                keras.Input((x.shape[1],)),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        optimizer = make()
        model.compile(optimizer=optimizer, loss="mse", steps_per_execution=32)
        history = model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
        results[name] = (history.history["loss"][-1], optimizer.statistics())
    return results


def main(epochs=3):
    for name, (loss, stats) in run(epochs).items():
        print(f"\n{name}: final loss {loss:.4f}, {stats.steps} steps measured")
        print(f"  {'statistic':<22}{'group':<22}{'last':>12}{'mean':>12}{'max':>12}")
        for (statistic, group), s in stats.items():
            print(
                f"  {statistic:<22}{group or '-':<22}{s.last:>12.4g}{s.mean:>12.4g}{s.max:>12.4g}"
            )
