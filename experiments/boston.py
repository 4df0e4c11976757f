"""Boston housing learning-rate study (a tutorial chapter on optimizers).

An MLP (13 unscaled features -> 4 ReLU units -> 1) trained with full-batch gradient descent for
10 000 epochs at learning rates 1e-3 ... 1e-9. At 1e-3 the network collapses to its output
bias: every hidden unit dies, which the optimizer statistics show as the hidden layer's
`zero_grad_fraction` reaching 1, and the bias settles on the mean target. Then the tutorial's
rescues at lr 1e-3: clipping each gradient to norm 2, mini-batches of 32, momentum 0.98, Adam.

The tutorial's initialisation is not known, so the collapse and each rescue also run with
several seeds: the median and range of their best test MSE sit beside the tutorial's number.

Full-batch training runs compiled: the training set is one `tf.data` element repeated, and
`steps_per_execution` epochs run per call. The test MSE and the output bias are recorded
inside the compiled train step after every update and read once at the end.
"""

import dataclasses
import math
import time

import numpy as np

NAME = "boston"
DESCRIPTION = "Boston housing LR study: full-batch collapse, clipping, mini-batches, momentum, Adam"
HIDDEN, OUTPUT = "hidden", "output"
ZERO_GRAD_TAG = f"optimizer/zero_grad_fraction/{HIDDEN}"

REFERENCE = [
    {"setting": "full batch, lr 1e-3", "tutorial": "collapse: hidden activations 0, bias 22.39"},
    {"setting": "clipnorm 2", "tutorial": "best test MSE 49.35"},
    {"setting": "mini-batches of 32", "tutorial": "best test MSE 30.62"},
    {"setting": "momentum 0.98", "tutorial": "best test MSE 29.12"},
    {"setting": "Adam", "tutorial": "best test MSE 28.04"},
]
REFERENCE_COLUMNS = ["setting", "tutorial"]
SEEDS_COLUMN = "seeds: best test MSE median (min..max)"

COLUMNS = [
    "setting", "learning_rate", "batch_size", "clipnorm", "epochs", "best_test_mse",
    "best_epoch", "final_train_mse", "final_test_mse", "hidden_zero_grad_fraction",
    "output_bias", "seeds_best_test_mse", "seconds",
]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Setting:
    """One training run. `batch_size=None` is full-batch; `clipnorm` clips each gradient."""

    variant: str
    learning_rate: float
    optimizer: str = "SGD"
    batch_size: int | None = None
    clipnorm: float | None = None
    momentum: float = 0.0

    @property
    def label(self):
        """`<variant> lr=<plain decimal>`: run names sort in numeric order."""
        from optiscope.experiments import harness

        return f"{self.variant} {harness.lr_name(self.learning_rate)}"


RESCUES = {
    "clipnorm 2": {"clipnorm": 2.0},
    "clipnorm 2, batch 32": {"clipnorm": 2.0, "batch_size": 32},
    "momentum 0.98, clipnorm 2, batch 32": {"clipnorm": 2.0, "batch_size": 32, "momentum": 0.98},
    "Adam, batch 32": {"optimizer": "Adam", "batch_size": 32},
}
"""The tutorial's rescues of lr 1e-3, each building on the previous; Adam runs unclipped."""
TUTORIAL_ROWS = dict(zip(RESCUES, [row["setting"] for row in REFERENCE[1:]], strict=True))


@dataclasses.dataclass(frozen=True)
class Config:
    data: str | None = None
    learning_rates: tuple = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9)
    epochs: int = 10_000
    rescues: tuple = tuple(RESCUES)
    rescue_learning_rate: float = 1e-3
    minibatch_epochs: int = 2000
    chunk: int = 100
    minibatch_chunk: int = 10
    seeds: int = 10  # the seed study of the collapse and the rescues
    seed: int = 42

    @classmethod
    def quick(cls, seed=42, data=None):
        return cls(
            data=data,
            learning_rates=(1e-3,),
            epochs=300,
            rescues=("clipnorm 2", "Adam, batch 32"),
            minibatch_epochs=30,
            seeds=2,
            seed=seed,
        )

    @property
    def seed_list(self):
        return tuple(self.seed + i for i in range(self.seeds))

    def settings(self):
        sweep = [Setting("full-batch GD", lr) for lr in self.learning_rates]
        return sweep + [
            Setting(name, self.rescue_learning_rate, **RESCUES[name]) for name in self.rescues
        ]


def load(config):
    """`{"train"|"test": (x, y)}` as float32, split as `keras.datasets.boston_housing`."""
    from optiscope.experiments import data

    (x_train, y_train), (x_test, y_test) = data.boston_housing(config.data)
    return {
        "train": (x_train.astype("float32"), y_train.astype("float32")),
        "test": (x_test.astype("float32"), y_test.astype("float32")),
    }


def mse(model, x, y):
    from keras import ops

    prediction = ops.convert_to_numpy(model(x, training=False))[:, 0].astype("float64")
    return float(np.mean((prediction - y) ** 2))


def _model(parts, steps):
    """The MLP, whose compiled train step also records, after every update, the test MSE and
    the output bias into `model.curves` (two vectors of `steps` values)."""
    import keras
    import tensorflow as tf
    from keras import ops

    class Recording(keras.Sequential):
        def train_step(self, data):
            logs = super().train_step(data)
            x, y = self.test_set
            error = ops.squeeze(self(x, training=False), -1) - y
            bias = self.get_layer(OUTPUT).bias[0]
            step = ops.reshape(ops.cast(self.optimizer.iterations - 1, "int32"), (1, 1))
            for name, value in (("test_mse", ops.mean(ops.square(error))), ("bias", bias)):
                self.curves[name].scatter_nd_update(step, ops.reshape(value, (1,)))
            return logs

    model = Recording(
        [
            keras.Input((parts["train"][0].shape[1],)),
            keras.layers.Dense(4, activation="relu", name=HIDDEN),
            keras.layers.Dense(1, name=OUTPUT),
        ],
        name="mlp",
    )
    model.test_set = tuple(tf.constant(a) for a in parts["test"])
    model.curves = {
        name: tf.Variable(tf.fill([steps], math.nan), trainable=False)
        for name in ("test_mse", "bias")
    }
    return model


def _recorder(tags):
    from optiscope.tracking import Sink

    class Recorder(Sink):
        """Keeps what is logged under `tags` as `{tag: [(step, value)]}`, to plot it."""

        def __init__(self):
            self.series = {tag: [] for tag in tags}

        def log_metrics(self, metrics, step):
            for tag, series in self.series.items():
                if tag in metrics:
                    series.append((step, float(metrics[tag])))

    return Recorder()


def train(setting, config, parts, sinks=None, callbacks=()):
    """Trains one setting; returns its record and its curves (per epoch, and the logged
    hidden-layer zero_grad_fraction). `callbacks`: more Keras callbacks for its `fit`."""
    import keras
    import tensorflow as tf

    from optiscope.callbacks import OptimizerStatsLogger
    from optiscope.optimizers import InstrumentedAdam, InstrumentedSGD
    from optiscope.tracking import NullSink

    x, y = parts["train"]
    full = setting.batch_size is None
    epochs = config.epochs if full else config.minibatch_epochs
    chunk = config.chunk if full else config.minibatch_chunk
    if epochs % chunk:
        raise ValueError(f"{epochs} epochs are not a multiple of the chunk ({chunk} epochs)")
    per_epoch = 1 if full else math.ceil(len(x) / setting.batch_size)
    steps_per_execution = chunk * per_epoch

    keras.utils.set_random_seed(config.seed)
    model = _model(parts, epochs * per_epoch)
    instrumentation = {"statistics": ["default", "zero_grad_fraction"], "aggregation": "layer"}
    clip = {"clipnorm": setting.clipnorm} if setting.clipnorm else {}
    if setting.optimizer == "Adam":
        optimizer = InstrumentedAdam(setting.learning_rate, **clip, **instrumentation)
    else:
        optimizer = InstrumentedSGD(
            setting.learning_rate, momentum=setting.momentum, **clip, **instrumentation
        )
    model.compile(optimizer=optimizer, loss="mse", steps_per_execution=steps_per_execution)
    if full:
        dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    else:
        dataset = (
            tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(len(x), seed=config.seed, reshuffle_each_iteration=True)
            .batch(setting.batch_size)
            .repeat()
        )
    sinks = sinks or NullSink()
    recorder = _recorder([ZERO_GRAD_TAG])
    logger = OptimizerStatsLogger(
        sinks=[sinks, recorder],
        interval=steps_per_execution,
        params={
            "data_description": f"Boston housing (Keras split), {len(x)} training rows, unscaled"
        },
    )
    start = time.perf_counter()
    model.fit(
        dataset,
        epochs=epochs // chunk,
        steps_per_epoch=steps_per_execution,
        shuffle=False,
        callbacks=[keras.callbacks.TerminateOnNaN(), _report(sinks, per_epoch), logger, *callbacks],
        verbose=0,
    )
    seconds = time.perf_counter() - start

    curves = _per_epoch(model, per_epoch)
    test = curves["test_mse"]
    best = int(np.nanargmin(test)) if np.isfinite(test).any() else None
    zero_grad = optimizer.statistics()[("zero_grad_fraction", HIDDEN)].last  # the logger is done
    record = {
        "setting": setting.label,
        "variant": setting.variant,
        "optimizer": setting.optimizer,
        "learning_rate": setting.learning_rate,
        "batch_size": setting.batch_size or f"{len(x)} (full)",
        "clipnorm": setting.clipnorm if setting.clipnorm else "none",
        "momentum": setting.momentum,
        "epochs": epochs,
        "best_test_mse": float(test[best]) if best is not None else math.nan,
        "best_epoch": best + 1 if best is not None else "",
        "final_train_mse": mse(model, *parts["train"]),
        "final_test_mse": mse(model, *parts["test"]),
        "hidden_zero_grad_fraction": zero_grad,
        "output_bias": float(model.get_layer(OUTPUT).bias.numpy()[0]),
        "hidden_units_alive": _alive(model, x),
        "seconds": seconds,
    }
    curves["zero_grad"] = np.asarray(recorder.series[ZERO_GRAD_TAG], "float64").reshape(-1, 2)
    curves["zero_grad"][:, 0] /= per_epoch  # steps -> epochs
    return record, curves


def _per_epoch(model, per_epoch):
    """The recorded curves at the end of each epoch: `{"test_mse"|"bias": array}`."""
    return {k: v.numpy()[per_epoch - 1 :: per_epoch] for k, v in model.curves.items()}


def _report(sinks, per_epoch):
    import keras

    class Report(keras.callbacks.Callback):
        """At the end of training, sends the test MSE and output bias after every epoch to
        the setting's sinks and puts the best and final test MSE into the logs, before the
        statistics logger (which follows it in the list) logs them as final metrics."""

        async_safe = True

        def on_train_end(self, logs=None):
            curves = _per_epoch(self.model, per_epoch)
            for epoch, (test, bias) in enumerate(zip(*curves.values(), strict=True), 1):
                sinks.log_metrics({"test_mse": test, "output_bias": bias}, step=epoch)
            if logs is not None and np.isfinite(curves["test_mse"]).any():
                logs["best_test_mse"] = float(np.nanmin(curves["test_mse"]))
                logs["test_mse"] = float(curves["test_mse"][-1])

    return Report()


def _alive(model, x):
    """How many hidden units are active (ReLU output > 0) for at least one row of `x`."""
    from keras import ops

    activations = ops.convert_to_numpy(model.get_layer(HIDDEN)(x))
    return int((activations > 0).any(axis=0).sum())


def run(config=Config(), tracker=None, options=None):
    """Runs every setting; returns a `harness.Result`."""
    from optiscope.experiments import harness

    options = options or harness.Options(track=False, progress=False)
    tracker = tracker or harness.Tracker(NAME, dataclasses.replace(options, track=False))
    started = time.perf_counter()
    parts = load(config)
    settings = config.settings()
    studied = [s for s in settings if _studied(s, config)]
    extra_seeds = config.seed_list[1:]
    records, curves = [], {}
    total = len(settings) + len(studied) * len(extra_seeds)
    with harness.progress(total, NAME, options.progress, options.fit_progress) as advance:
        for setting in settings:
            with tracker.setting(setting.label, dataclasses.asdict(setting)) as sinks:
                record, curves[setting.label] = train(
                    setting, config, parts, sinks, advance.fit(setting.label)
                )
            record["seeds_best_test_mse"] = ""
            records.append(record)
            advance(f"{NAME}: {setting.label}")
        for setting in studied:
            record = next(r for r in records if r["setting"] == setting.label)
            study = [record]
            for seed in extra_seeds:
                seeded = dataclasses.replace(config, seed=seed)
                params = {**dataclasses.asdict(seeded), **dataclasses.asdict(setting)}
                name = f"{setting.label} seed={seed}"
                sinks = tracker.setting(name, params, tags={"optiscope.study": "seeds"})
                study.append(train(setting, seeded, parts, sinks, advance.fit(name))[0])
                advance(f"{NAME}: {name}")
            record.update(_seed_summary(study, config))
    wall = time.perf_counter() - started
    return harness.Result(
        experiment=NAME,
        records=records,
        columns=COLUMNS,
        reference=_reference(records, parts),
        reference_columns=REFERENCE_COLUMNS + ["optiscope", SEEDS_COLUMN],
        notes=_notes(records, curves, parts, config, wall),
        figures={
            "test_mse": plot_test_mse(records, curves),
            "collapse": plot_collapse(records, curves, parts, config),
        },
    )


def _studied(setting, config):
    """The seed study covers the collapse (full batch at the rescue rate) and the rescues."""
    collapse = setting.variant == "full-batch GD" and (
        setting.learning_rate == config.rescue_learning_rate
    )
    return collapse or setting.variant in RESCUES


def _collapsed(record):
    """Every hidden unit dead at the end: the network predicts its output bias."""
    return record["hidden_units_alive"] == 0


def _seed_summary(study, config):
    best = np.array([r["best_test_mse"] for r in study], "float64")
    finite = best[np.isfinite(best)]
    median = float(np.median(finite)) if len(finite) else math.nan
    low = float(finite.min()) if len(finite) else math.nan
    high = float(finite.max()) if len(finite) else math.nan
    return {
        "seed_list": list(config.seed_list),
        "seeds_best_test_mse_values": best.tolist(),
        "seeds_best_test_mse_median": median,
        "seeds_best_test_mse_min": low,
        "seeds_best_test_mse_max": high,
        "seeds_collapsed": sum(_collapsed(r) for r in study),
        "seeds_best_test_mse": f"{median:.2f} ({low:.2f}..{high:.2f})",
    }


def _by_variant(records):
    return {r["variant"]: r for r in records if r["variant"] in RESCUES}


def _collapse(records):
    return next(
        (r for r in records if r["variant"] == "full-batch GD" and r["learning_rate"] == 1e-3),
        None,
    )


def _seed_cell(record):
    if "seeds_best_test_mse_median" not in record:
        return ""
    n = len(record["seed_list"])
    return f"{record['seeds_best_test_mse']}, {n} seeds; collapsed {record['seeds_collapsed']}/{n}"


def _reference(records, parts):
    rows = []
    collapse = _collapse(records)
    if collapse:
        zero_grad, bias = collapse["hidden_zero_grad_fraction"], collapse["output_bias"]
        mean_target = parts["train"][1].astype("float64").mean()
        rows.append(
            {
                **REFERENCE[0],
                "optiscope": f"hidden zero_grad_fraction {zero_grad:.2f}, bias {bias:.2f} "
                f"(mean target {mean_target:.2f})",
                SEEDS_COLUMN: _seed_cell(collapse),
            }
        )
    rescued = _by_variant(records)
    for variant, row in TUTORIAL_ROWS.items():
        if variant in rescued:
            reference = next(r for r in REFERENCE if r["setting"] == row)
            record = rescued[variant]
            rows.append(
                {
                    **reference,
                    "optiscope": f"best test MSE {record['best_test_mse']:.2f} "
                    f"(epoch {record['best_epoch']} of {record['epochs']}; {variant})",
                    SEEDS_COLUMN: _seed_cell(record),
                }
            )
    return rows


def _notes(records, curves, parts, config, wall):
    mean_target = float(parts["train"][1].astype("float64").mean())
    constant = float(np.mean((mean_target - parts["test"][1].astype("float64")) ** 2))
    per_epoch = math.ceil(len(parts["train"][1]) / 32)
    notes = [
        f"Protocol: seed {config.seed}; features unscaled; MSE loss; plain SGD unless stated. "
        f"Full-batch rows: {config.epochs} epochs = {config.epochs} updates, "
        f"{config.chunk} per compiled execution; mini-batch rows (batch 32): "
        f"{config.minibatch_epochs} epochs = {config.minibatch_epochs * per_epoch} updates, "
        f"{config.minibatch_chunk} epochs per compiled execution. "
        "Gradient clipping (Keras clipnorm: each gradient tensor to norm 2) only where the "
        "clipnorm column says so. Rescue rows use lr "
        f"{config.rescue_learning_rate:g} and build on each other as the tutorial's do; Adam "
        "runs unclipped. Best test MSE: the lowest test MSE after any epoch.",
    ]
    collapse = _collapse(records)
    if collapse:
        logged = curves[collapse["setting"]]["zero_grad"]
        first = logged[0] if len(logged) else (math.nan, math.nan)
        notes.append(
            f"Collapse at lr 1e-3: the hidden layer's zero_grad_fraction is {first[1]:.3f} "
            f"averaged over epochs 1-{int(first[0])} (non-zero hidden gradients add up to "
            f"{first[0] * (1 - first[1]):.2f} epoch's worth there: the units die in the first "
            f"update(s)) and {collapse['hidden_zero_grad_fraction']:.3f} at the end, when "
            f"{collapse['hidden_units_alive']} of 4 hidden units is active for any training "
            f"row; the output bias is {collapse['output_bias']:.4f} against the mean training "
            f"target {mean_target:.4f} (the tutorial: 22.39): the network predicts its output "
            f"bias for every row (final test MSE {collapse['final_test_mse']:.2f}; predicting "
            f"the mean training target gives {constant:.2f})."
        )
    dead = [
        f"{r['learning_rate']:g}"
        for r in records
        if r["variant"] == "full-batch GD" and r["hidden_zero_grad_fraction"] >= 1.0
    ]
    if dead:
        notes.append(f"Full-batch learning rates whose hidden layer ends dead: {', '.join(dead)}.")
    sweep = [r for r in records if r["variant"] == "full-batch GD" and r["best_epoch"] != ""]
    if sweep:
        best = min(sweep, key=lambda r: r["best_test_mse"])
        notes.append(
            f"Best full-batch learning rate without clipping: {best['learning_rate']:g} "
            f"(best test MSE {best['best_test_mse']:.2f} at epoch {best['best_epoch']})."
        )
    rescued = _by_variant(records)
    order = [rescued[v] for v in RESCUES if v in rescued]
    if len(order) > 1:
        steps = [
            f"{a['variant']} -> {b['variant']}: "
            f"{'better' if b['best_test_mse'] < a['best_test_mse'] else 'not better'} "
            f"({a['best_test_mse']:.2f} -> {b['best_test_mse']:.2f})"
            for a, b in zip(order, order[1:], strict=False)
        ]
        notes.append("The tutorial's trend, each step against the previous: " + "; ".join(steps))
    notes += _seed_notes(records)
    late = [r["setting"] for r in records if r["best_epoch"] == r["epochs"]]
    if late:
        notes.append(f"Still improving at the last epoch (budget-limited): {', '.join(late)}.")
    notes.append(f"Wall time {wall:.1f} s for {len(records)} settings.")
    return notes


def _seed_notes(records):
    studied = [r for r in records if "seeds_best_test_mse_median" in r]
    if not studied:
        return []
    seeds = studied[0]["seed_list"]
    tutorial = {
        variant: next(r["tutorial"] for r in REFERENCE if r["setting"] == row)
        for variant, row in TUTORIAL_ROWS.items()
    }
    rows = [
        f"{r['variant']}: {r['seeds_best_test_mse']} (tutorial: "
        f"{tutorial[r['variant']].removeprefix('best test MSE ')})"
        for r in studied
        if r["variant"] in RESCUES
    ]
    notes = [
        f"Seed study, seeds {seeds[0]}-{seeds[-1]} (the tutorial's initialisation is not known): "
        "best test MSE median (min..max) per row: " + "; ".join(rows) + "."
    ]
    collapse = _collapse(studied)
    if collapse:
        notes.append(
            f"Full batch at lr 1e-3 collapses (every hidden unit dead at the end) for "
            f"{collapse['seeds_collapsed']} of {len(seeds)} seeds; best test MSE "
            f"{collapse['seeds_best_test_mse']}."
        )
    return notes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_test_mse(records, curves):
    """Test MSE after every epoch, per setting (log scales)."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(10, 5.5))
    colors = plt.get_cmap("viridis")
    sweep = [r for r in records if r["variant"] == "full-batch GD"]
    for i, record in enumerate(records):
        test = curves[record["setting"]]["test_mse"]
        epochs = np.arange(1, len(test) + 1)
        if record in sweep:
            style = {"color": colors(i / max(len(sweep) - 1, 1)), "lw": 1.2}
        else:
            style = {"lw": 1.6, "ls": "--"}
        ax.plot(epochs, test, label=record["setting"], **style)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="epoch",
        ylabel="test MSE",
        title="Boston housing: test MSE per epoch (solid: full-batch GD, dashed: rescues)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    return figure


def plot_collapse(records, curves, parts, config):
    """The collapse at lr 1e-3: hidden zero_grad_fraction (as logged) and output bias."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    shown = [r for r in records if r["learning_rate"] == config.rescue_learning_rate]
    for record in shown:
        zero_grad = curves[record["setting"]]["zero_grad"]
        bias = curves[record["setting"]]["bias"]
        style = {"lw": 2.2} if record is _collapse(records) else {"lw": 1.2, "ls": "--"}
        if len(zero_grad):
            left.plot(
                zero_grad[:, 0], zero_grad[:, 1], marker=".", ms=3, label=record["setting"], **style
            )
        right.plot(np.arange(1, len(bias) + 1), bias, label=record["setting"], **style)
    left.set(
        xscale="log",
        ylim=(-0.05, 1.05),
        xlabel="epoch",
        ylabel=f"zero_grad_fraction of '{HIDDEN}'",
        title="hidden layer: fraction of exactly-zero gradients\n(logged window means)",
    )
    mean_target = float(parts["train"][1].mean())
    right.axhline(mean_target, color="gray", ls=":", label=f"mean target {mean_target:.2f}")
    right.set(
        xscale="log", xlabel="epoch", ylabel="output bias", title="output bias after each epoch"
    )
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.suptitle(
        f"Boston housing at lr {config.rescue_learning_rate:g}: the collapse and its rescues"
    )
    figure.tight_layout()
    return figure
