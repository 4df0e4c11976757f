"""Momentum trajectories (a post on writing optimizers by subclassing).

Plain SGD, EMAMomentum and bias-corrected EMAMomentum on f(x) = a x^2 / 2 (minimum at 0) from a
far start, at the same learning rate and momentum. The post's claims, checked numerically: EMA
momentum starts slower than plain SGD; the bias-corrected variant tracks plain SGD at first; both
momentum variants overshoot 0 and oscillate more loosely than plain SGD (which, with lr * a < 1,
never overshoots). The step loop runs compiled, in chunks of 50 steps between which the
optimizer's statistics are read and logged.
"""

import dataclasses

import numpy as np

NAME = "momentum"
DESCRIPTION = "SGD vs EMA momentum vs bias-corrected EMA momentum on a 1-D quadratic"
CHUNK = 50
EARLY = 10  # "at first": the first EARLY steps
TRACKING = 5  # bias correction "tracks SGD": the first TRACKING steps
SGD, EMA, CORRECTED = "SGD", "EMAMomentum", "EMAMomentum, bias-corrected"

REFERENCE = [
    {"claim": "EMA momentum starts slower than plain SGD"},
    {"claim": "the bias-corrected variant tracks plain SGD at first"},
    {"claim": "both momentum variants overshoot 0 and oscillate more loosely than plain SGD"},
]
REFERENCE_COLUMNS = ["claim"]


@dataclasses.dataclass(frozen=True)
class Config:
    start: float = 10.0
    curvature: float = 1.0  # a in f(x) = a x^2 / 2
    learning_rate: float = 0.1
    momentum: float = 0.9
    steps: int = 200
    seed: int = 42

    @classmethod
    def quick(cls, seed=42):
        return cls(seed=seed)  # already tiny: the quick run is the full one


def objective(x, curvature=1.0):
    """f(x) = a x^2 / 2, for NumPy arrays and tensors alike."""
    return curvature * x**2 / 2


def optimizers(config):
    """Rows of the table: name -> factory()."""
    from optiscope.optimizers import EMAMomentum, InstrumentedSGD

    lr, mu = config.learning_rate, config.momentum
    return {
        SGD: lambda: InstrumentedSGD(lr),
        EMA: lambda: EMAMomentum(lr, momentum=mu),
        CORRECTED: lambda: EMAMomentum(lr, momentum=mu, bias_correction=True),
    }


def run_setting(make_optimizer, config, sinks):
    """Runs one optimizer; returns the path of x (steps + 1 values, float64)."""
    import keras
    import tensorflow as tf

    from optiscope.callbacks.publishing import Publisher

    publisher = Publisher(sinks, describe=True)
    x = keras.Variable(np.float32(config.start), name="x")
    optimizer = make_optimizer()
    optimizer.build([x])

    @tf.function
    def chunk(steps):
        path = tf.TensorArray(tf.float32, size=steps)
        for i in tf.range(steps):
            with tf.GradientTape() as tape:
                value = objective(x, config.curvature)
            optimizer.apply([tape.gradient(value, x)], [x])
            path = path.write(i, x)
        return path.stack()

    xs = [np.float32(config.start)]
    for first in range(0, config.steps, CHUNK):
        xs.extend(chunk(tf.constant(min(CHUNK, config.steps - first))).numpy())
        values = np.asarray(xs[first + 1 :], "float64")
        for step, value in enumerate(values, start=first + 1):
            sinks.log_metrics({"x": value, "loss": objective(value, config.curvature)}, step)
        publisher.read(optimizer)
    return np.asarray(xs, "float64")


def describe(path):
    """The numbers of one path: x at a few steps, overshoots, sign changes."""
    sign = np.sign(path[0])
    overshoot = np.maximum(-sign * path, 0.0)  # how far past 0, on the far side
    signs = np.sign(path[path != 0])
    beyond = np.flatnonzero(overshoot > 0)
    return {
        **{f"x_{k}": float(path[k]) for k in (1, 5, 10, 50)},
        "first_overshoot_step": int(beyond[0]) if len(beyond) else None,
        "max_overshoot": float(overshoot.max()),
        "sign_changes": int(np.sum(signs[1:] != signs[:-1])),
        "final_abs_x": float(abs(path[-1])),
    }


def check_claims(paths):
    """{optimizer: {claim: (holds, explanation)}} for the three optimizers' paths."""
    sgd, ema, corrected = paths[SGD], paths[EMA], paths[CORRECTED]
    n_sgd, n_ema, n_bc = describe(sgd), describe(ema), describe(corrected)
    k = np.arange(1, EARLY + 1)
    slower = bool(np.all(np.abs(ema[k]) > np.abs(sgd[k])))
    t = np.arange(1, TRACKING + 1)
    gap_bc = float(np.max(np.abs(corrected[t] - sgd[t])))
    gap_ema = float(np.max(np.abs(ema[t] - sgd[t])))
    first_equal = bool(np.isclose(corrected[1], sgd[1], rtol=1e-6, atol=0))
    tracks = bool(first_equal and gap_bc <= 0.1 * abs(sgd[0]))

    def looser(n):
        return bool(
            n["first_overshoot_step"] is not None
            and n["sign_changes"] > n_sgd["sign_changes"]
            and n["max_overshoot"] > n_sgd["max_overshoot"]
        )

    def oscillation(n):
        return (
            f"first overshoot at step {n['first_overshoot_step']}, max overshoot "
            f"{n['max_overshoot']:.4g}, {n['sign_changes']} sign changes (SGD: "
            f"{n_sgd['sign_changes']} sign changes, max overshoot {n_sgd['max_overshoot']:.4g})"
        )

    return {
        SGD: {
            "never_overshoots": (
                n_sgd["sign_changes"] == 0,
                f"plain SGD never crosses 0 (lr * a < 1): {n_sgd['sign_changes']} sign changes",
            )
        },
        EMA: {
            "starts_slower_than_sgd": (
                slower,
                f"|x| stays larger than SGD's for steps 1-{EARLY}: after 1 step {ema[1]:.4g} vs "
                f"{sgd[1]:.4g}, after 5 {ema[5]:.4g} vs {sgd[5]:.4g}, after 10 {ema[10]:.4g} vs "
                f"{sgd[10]:.4g}",
            ),
            "overshoots_more_loosely_than_sgd": (looser(n_ema), oscillation(n_ema)),
        },
        CORRECTED: {
            "tracks_sgd_at_first": (
                tracks,
                f"first step {corrected[1]:.8g} vs SGD's {sgd[1]:.8g} "
                f"({'equal' if first_equal else 'different'} to float32 rounding); over steps "
                f"1-{TRACKING} at most {gap_bc:.3g} from SGD (<= 10% of |x0| required), "
                f"EMAMomentum {gap_ema:.3g}",
            ),
            "overshoots_more_loosely_than_sgd": (looser(n_bc), oscillation(n_bc)),
        },
    }


def run(config=Config(), tracker=None, options=None):
    """Runs the three optimizers; returns a `harness.Result`."""
    from optiscope.experiments import harness

    options = options or harness.Options(track=False, progress=False)
    tracker = tracker or harness.Tracker(NAME, dataclasses.replace(options, track=False))
    rows = optimizers(config)
    paths = {}
    with harness.progress(len(rows), NAME, options.progress) as advance:
        for name, make in rows.items():
            with tracker.setting(name, {"setting": name}) as sinks:
                paths[name] = run_setting(make, config, sinks)
                sinks.log_hparams(
                    {"learning_rate": config.learning_rate},
                    {"final_abs_x": float(abs(paths[name][-1]))},
                )
            advance(f"{NAME}: {name}")
    claims = check_claims(paths)
    records = []
    for name, path in paths.items():
        record = {"optimizer": name, "learning_rate": config.learning_rate}
        record["momentum"] = 0.0 if name == SGD else config.momentum
        record.update(describe(path))
        record["claims"] = {claim: holds for claim, (holds, _) in claims[name].items()}
        records.append(record)
    notes = [
        f"f(x) = {config.curvature:g} x^2 / 2 from x0 = {config.start:g}, learning rate "
        f"{config.learning_rate:g} for all three, momentum {config.momentum:g}, "
        f"{config.steps} steps (float32).",
    ]
    for name, checks in claims.items():
        for claim, (holds, text) in checks.items():
            notes.append(f"{name}, {claim}: {'holds' if holds else 'does NOT hold'} ({text}).")
    return harness.Result(
        experiment=NAME,
        records=records,
        columns=[
            "optimizer",
            "learning_rate",
            "momentum",
            "x_1",
            "x_5",
            "x_10",
            "x_50",
            "first_overshoot_step",
            "max_overshoot",
            "sign_changes",
            "final_abs_x",
        ],
        reference=REFERENCE,
        reference_columns=REFERENCE_COLUMNS,
        notes=notes,
        figures={"trajectories": plot(paths, config)},
    )


def plot(paths, config):
    """x(t) of the three optimizers, and |x| on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, path in paths.items():
        steps = np.arange(len(path))
        left.plot(steps, path, label=name, lw=1.5)
        right.plot(steps, np.abs(path), label=name, lw=1.5)
    left.axhline(0, color="black", lw=0.8, ls=":")
    left.set(title="x(t)", xlabel="step", ylabel="x")
    right.set(title="|x(t)| (log scale)", xlabel="step", ylabel="|x|", yscale="log")
    left.legend()
    figure.suptitle(
        f"f(x) = {config.curvature:g} x^2 / 2 from x0 = {config.start:g}: lr "
        f"{config.learning_rate:g}, momentum {config.momentum:g}"
    )
    figure.tight_layout()
    return figure
