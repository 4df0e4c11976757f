"""One-dimensional convergence test (TensorFlow's "custom optimizers with Core APIs" guide).

L(x) = 2x^4 + 3x^3 + 2 (minimum at x = -9/8, saddle at 0), from x = 2, at most 2000
iterations, learning rates 1e-3, 1e-2, 1e-1. "Converged": x did not change in a step (float32
equality); "exploded": the gradient became NaN. The step loop runs compiled, in chunks of 100
iterations between which the optimizer's statistics are read and logged.
"""

import dataclasses

import numpy as np

NAME = "convergence"
DESCRIPTION = "1-D convergence test of the TensorFlow guide: GD, momentum, two Adams"
CHUNK = 100

REFERENCE = [
    {"optimizer": "gradient descent", "lr 1e-3": "not converged", "lr 1e-2": "not converged",
     "lr 1e-1": "exploded at 6"},
    {"optimizer": "momentum 0.7", "lr 1e-3": "not converged", "lr 1e-2": "converged in 80",
     "lr 1e-1": "exploded at 6"},
    {"optimizer": "Adam, the guide's own", "lr 1e-3": "not converged",
     "lr 1e-2": "not converged", "lr 1e-1": "converged in 1156"},
]  # fmt: skip
REFERENCE_COLUMNS = ["optimizer", "lr 1e-3", "lr 1e-2", "lr 1e-1"]


@dataclasses.dataclass(frozen=True)
class Config:
    learning_rates: tuple = (1e-3, 1e-2, 1e-1)
    max_iterations: int = 2000
    start: float = 2.0
    momentum: float = 0.7
    seed: int = 42

    @classmethod
    def quick(cls, seed=42):
        return cls(seed=seed)  # already a few seconds: the quick run is the full table


def loss(x):
    """The guide's objective, written as the guide writes it (float32 rounding matters)."""
    return 2 * (x**4) + 3 * (x**3) + 2


class GuideAdam:
    """Adam in the guide's update order: moments `m = b1*m + (1-b1)*g`, `v = b2*v + (1-b2)*g^2`;
    bias corrections with `t` from 1 computed in float64 (the guide uses Python floats);
    `x -= lr * m_hat / (sqrt(v_hat) + eps)`."""

    def __init__(self, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        import tensorflow as tf

        self.learning_rate, self.beta_1, self.beta_2, self.epsilon = (
            learning_rate, beta_1, beta_2, epsilon
        )  # fmt: skip
        self.m = tf.Variable(0.0)
        self.v = tf.Variable(0.0)
        self.t = tf.Variable(1.0, dtype=tf.float64)

    def apply(self, grads, variables):
        import tensorflow as tf

        (g,), (x,) = grads, variables
        self.m.assign(self.beta_1 * self.m + (1 - self.beta_1) * g)
        self.v.assign(self.beta_2 * self.v + (1 - self.beta_2) * tf.square(g))
        m_hat = self.m / tf.cast(
            1 - tf.pow(tf.constant(self.beta_1, tf.float64), self.t), tf.float32
        )
        v_hat = self.v / tf.cast(
            1 - tf.pow(tf.constant(self.beta_2, tf.float64), self.t), tf.float32
        )
        x.assign_sub(self.learning_rate * (m_hat / (tf.sqrt(v_hat) + self.epsilon)))
        self.t.assign_add(1.0)


def optimizers(config):
    """Rows of the table: name -> factory(learning rate)."""
    from optiscope.optimizers import InstrumentedAdam, InstrumentedSGD

    return {
        "gradient descent": lambda lr: InstrumentedSGD(lr),
        f"momentum {config.momentum}": lambda lr: InstrumentedSGD(lr, momentum=config.momentum),
        "Adam, the guide's update order": lambda lr: GuideAdam(lr),
        "Adam, keras.optimizers.Adam": lambda lr: InstrumentedAdam(lr),
    }


def run_setting(make_optimizer, learning_rate, config, sinks):
    """Runs one (optimizer, learning rate); returns its record and the path of x."""
    import keras
    import tensorflow as tf

    from optiscope.callbacks.publishing import Publisher

    publisher = Publisher(sinks, describe=True)
    x = keras.Variable(np.float32(config.start), name="x")
    optimizer = make_optimizer(learning_rate)
    if isinstance(optimizer, keras.Optimizer):
        optimizer.build([x])

    @tf.function
    def chunk(first, last):
        """Iterations first..last-1 (1-based); returns (outcome, iteration, path of x)."""
        path = tf.TensorArray(tf.float32, size=last - first)
        outcome, at = tf.constant(0), last - 1
        for i in tf.range(first, last):
            with tf.GradientTape() as tape:
                value = loss(x)
            gradient = tape.gradient(value, x)
            if tf.math.is_nan(gradient):
                outcome, at = tf.constant(2), i
                break
            old = tf.identity(x)
            optimizer.apply([gradient], [x])
            path = path.write(i - first, x)
            if tf.equal(x, old):
                outcome, at = tf.constant(1), i
                break
        return outcome, at, path.stack()

    outcome, iterations, xs = 0, config.max_iterations, [config.start]
    for first in range(1, config.max_iterations + 1, CHUNK):
        last = min(first + CHUNK, config.max_iterations + 1)
        code, at, path = (v.numpy() for v in chunk(tf.constant(first), tf.constant(last)))
        xs.extend(path[: int(at) - first + (code != 2)].tolist())
        _log_chunk(sinks, publisher, optimizer, xs, first)
        if code:
            outcome, iterations = int(code), int(at)
            break
    record = {
        "optimizer": None,
        "learning_rate": learning_rate,
        "outcome": ("not_converged", "converged", "exploded")[outcome],
        "iterations": iterations,
        "final_x": float(xs[-1]),
    }
    return record, np.asarray(xs, dtype="float64")


def _log_chunk(sinks, publisher, optimizer, xs, first):
    values = np.asarray(xs, dtype="float64")
    with np.errstate(all="ignore"):
        losses = 2 * values**4 + 3 * values**3 + 2
    for step in range(first, len(xs)):
        sinks.log_metrics({"x": values[step], "loss": losses[step]}, step)
    publisher.read(optimizer)


def describe(record):
    if record["outcome"] == "converged":
        return f"converged in {record['iterations']}"
    if record["outcome"] == "exploded":
        return f"exploded at {record['iterations']}"
    return f"not converged in {record['iterations']}"


def run(config=Config(), tracker=None, options=None):
    """Runs the table; returns a `harness.Result`."""
    from optiscope.experiments import harness

    options = options or harness.Options(track=False, progress=False)
    tracker = tracker or harness.Tracker(NAME, dataclasses.replace(options, track=False))
    rows = optimizers(config)
    records, paths = [], {}
    total = len(rows) * len(config.learning_rates)
    with harness.progress(total, NAME, options.progress) as advance:
        for name, make in rows.items():
            for lr in config.learning_rates:
                params = {"setting": name, "learning_rate": lr}
                with tracker.setting(f"{name}/{harness.lr_name(lr)}", params) as sinks:
                    record, path = run_setting(make, lr, config, sinks)
                    record["optimizer"] = name
                    sinks.log_hparams({"learning_rate": lr}, {"iterations": record["iterations"]})
                records.append(record)
                paths[(name, lr)] = path
                advance(f"{NAME}: {name} lr={lr:g}")
    result = harness.Result(
        experiment=NAME,
        records=records,
        columns=["optimizer", "learning_rate", "outcome", "iterations", "final_x"],
        reference=REFERENCE,
        reference_columns=REFERENCE_COLUMNS,
        notes=_notes(records),
        figures={"paths": plot(paths, config)},
    )
    return result


def _notes(records):
    by = {(r["optimizer"], r["learning_rate"]): r for r in records}
    guide = by.get(("Adam, the guide's update order", 0.1))
    keras_adam = by.get(("Adam, keras.optimizers.Adam", 0.1))
    notes = [
        "Gradient descent and momentum are keras.optimizers.SGD(lr) and SGD(lr, momentum=0.7).",
    ]
    if guide and keras_adam:
        notes.append(
            f"At lr 0.1 the guide's Adam {describe(guide)} iterations and Keras' Adam "
            f"{describe(keras_adam)} iterations: Keras folds the bias correction into the "
            "learning rate (lr * sqrt(1 - b2^t) / (1 - b1^t)), adds epsilon to the "
            "uncorrected sqrt(v) and updates the moments as m += (g - m)(1 - b1); "
            "convergence is float32 equality, so the different rounding order changes "
            "the iteration at which x stops moving."
        )
    return notes


def plot(paths, config):
    """Parameter paths over a heat map of log L against iteration, one panel per learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = config.learning_rates
    figure, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4), squeeze=False)
    xs = np.linspace(-2.5, 2.5, 400)
    with np.errstate(all="ignore"):
        heat = np.log(loss(xs) - loss(-9 / 8) + 1e-3)
    for ax, lr in zip(axes[0], rates, strict=True):
        ax.imshow(
            np.repeat(heat[:, None], 2, axis=1),
            extent=(0, config.max_iterations, xs[0], xs[-1]),
            aspect="auto", origin="lower", cmap="viridis", alpha=0.8,
        )  # fmt: skip
        for (name, rate), path in paths.items():
            if rate == lr:
                ax.plot(np.arange(len(path)), np.clip(path, xs[0], xs[-1]), label=name, lw=1.5)
        ax.axhline(-9 / 8, color="white", ls=":", lw=1)
        ax.set(title=f"learning rate {lr:g}", xlabel="iteration", ylabel="x", xscale="symlog")
    axes[0][0].legend(fontsize=7, loc="lower right")
    figure.suptitle("x over log(L(x) - L*) (white: minimum at -9/8)")
    figure.tight_layout()
    return figure
