"""Rosenbrock (a blog post implementing PowerSign/AddSign), learning rate tuned per optimizer.

f(x, y) = (1 - x)^2 + 100 (y - x^2)^2, minimum at (1, 1). Every optimizer runs 4000 steps from
the post's start (-2.39, -1.57) and from random starts in [-3, 3]^2, at every learning rate of a
log grid; the rate kept is the one with the lowest median final distance to (1, 1) over the
random starts. All starting points are the rows of one (starts + 1, 2) variable whose loss is the
sum of f over the rows: every optimizer here updates element-wise (no clipping, no weight decay),
so the rows are independent runs. One optimizer and one compiled (XLA) loop serve the whole grid:
before each rate, the optimizer's variables go back to their values when freshly built. The loop
runs in chunks of 100 steps between which the distances and the optimizer's statistics (over the
whole variable, i.e. all starts together) are read and logged.

Beside them run the post's own PowerSign, AddSign and RMSprop as its code computed them
("as published", see `as_published`), each at the rate of a fine log grid whose point after
501 steps from the post's start is nearest the post's; the table's other rows are predictions.
"""

import dataclasses

import numpy as np

NAME = "rosenbrock"
DESCRIPTION = "Rosenbrock from the post's start and random starts, lr tuned per optimizer"
CHUNK = 100
MINIMUM = (1.0, 1.0)
REPORT_STEPS = (1, 501, 1001, 2001, 3001)
RULE = "fewest diverged random starts, then lowest median final distance, then smaller rate"

REFERENCE = [
    {"step": 0, "RMSprop (x, y, f)": "(-2.39, -1.57), distance 4.26", "AddSign": "same",
     "PowerSign": "same"},
    {"step": 501, "RMSprop (x, y, f)": "(0.66, 0.43, 0.13)", "AddSign": "(0.41, 0.17, 0.34)",
     "PowerSign": "(0.97, 0.95, 0.00)"},
    {"step": 1001, "RMSprop (x, y, f)": "(0.83, 0.67, 0.05)", "AddSign": "(0.55, 0.30, 0.21)",
     "PowerSign": "(0.98, 0.96, 0.00)"},
    {"step": 2001, "RMSprop (x, y, f)": "(0.93, 0.85, 0.03)", "AddSign": "(0.69, 0.48, 0.09)",
     "PowerSign": "(0.98, 0.96, 0.00)"},
    {"step": 3001, "RMSprop (x, y, f)": "(0.96, 0.92, 0.02)", "AddSign": "(0.78, 0.60, 0.05)",
     "PowerSign": "(0.98, 0.97, 0.00)"},
]  # fmt: skip
REFERENCE_COLUMNS = ["step", "RMSprop (x, y, f)", "AddSign", "PowerSign"]
POST_POINTS = {
    "RMSprop": {501: (0.66, 0.43), 1001: (0.83, 0.67), 2001: (0.93, 0.85), 3001: (0.96, 0.92)},
    "AddSign": {501: (0.41, 0.17), 1001: (0.55, 0.30), 2001: (0.69, 0.48), 3001: (0.78, 0.60)},
    "PowerSign": {501: (0.97, 0.95), 1001: (0.98, 0.96), 2001: (0.98, 0.96), 3001: (0.98, 0.97)},
}
"""The post's (x, y) by optimizer and step, as in its table."""
AS_PUBLISHED = "as published"
VALLEY = 0.1  # "reached the minimum": within this distance of (1, 1)


@dataclasses.dataclass(frozen=True)
class Config:
    start: tuple = (-2.39, -1.57)
    steps: int = 4000
    learning_rates: tuple = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
    starts: int = 32  # random starts, uniform in [-box, box]^2
    box: float = 3.0
    momentum: float = 0.9
    as_published_grid: tuple = (1e-5, 1e-1, 40)  # lowest, highest, rates per decade
    seed: int = 42

    @classmethod
    def quick(cls, seed=42):
        return cls(
            steps=1000,
            learning_rates=(1e-4, 1e-3, 1e-2),
            starts=4,
            as_published_grid=(1e-4, 1e-1, 10),
            seed=seed,
        )

    def as_published_rates(self):
        """The fine log grid the as-published rates are chosen from."""
        low, high, per_decade = self.as_published_grid
        exponents = np.arange(
            round(np.log10(low) * per_decade), round(np.log10(high) * per_decade) + 1
        )
        return [float(f"{r:.4g}") for r in 10.0 ** (exponents / per_decade)]


def rosenbrock(x, y, xp=np):
    """f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 with the array module `xp` (numpy, keras.ops, tf)."""
    return xp.square(1 - x) + 100 * xp.square(y - xp.square(x))


def optimizers(config):
    """Rows of the table: name -> factory(learning rate)."""
    from optiscope import optimizers as o

    mu = config.momentum
    return {
        "SGD": lambda lr: o.InstrumentedSGD(lr),
        f"SGD momentum {mu}": lambda lr: o.InstrumentedSGD(lr, momentum=mu),
        "EMAMomentum": lambda lr: o.EMAMomentum(lr, momentum=mu),
        "EMAMomentum, bias-corrected": lambda lr: o.EMAMomentum(
            lr, momentum=mu, bias_correction=True
        ),
        "SignAveraging": lambda lr: o.SignAveraging(lr),
        "PowerSign": lambda lr: o.PowerSign(lr),
        "AddSign": lambda lr: o.AddSign(lr),
        "RMSprop": lambda lr: o.InstrumentedRMSprop(lr),
        "Adam": lambda lr: o.InstrumentedAdam(lr),
    }


def starting_points(config):
    """Row 0: the post's start; then `config.starts` uniform points in [-box, box]^2."""
    rng = np.random.default_rng(config.seed)
    random = rng.uniform(-config.box, config.box, size=(config.starts, 2))
    return np.concatenate([np.asarray([config.start]), random]).astype("float32")


def compile_runs(make_optimizer, points):
    """Returns `run(learning_rate, steps, log=None) -> path`, the optimizer from every row of
    `points` at once; `path` has shape (steps + 1, rows, 2) and `log(optimizer, step, points)`
    is called after every chunk. The optimizer is built and its loop compiled once; every run
    starts from the optimizer's freshly built state."""
    import keras
    import tensorflow as tf

    xy = keras.Variable(points, name="xy")
    optimizer = make_optimizer(1.0)
    optimizer.build([xy])
    fresh = [keras.ops.convert_to_numpy(v) for v in optimizer.variables]

    @tf.function(jit_compile=True)
    def chunk(steps):
        path = tf.TensorArray(tf.float32, size=steps)
        for i in tf.range(steps):
            with tf.GradientTape() as tape:
                value = tf.reduce_sum(rosenbrock(xy[:, 0], xy[:, 1], xp=keras.ops))
            optimizer.apply([tape.gradient(value, xy)], [xy])
            path = path.write(i, xy)
        return path.stack()

    def run(learning_rate, steps, log=None):
        for variable, value in zip(optimizer.variables, fresh, strict=True):
            variable.assign(value)
        optimizer.learning_rate = learning_rate
        xy.assign(points)
        parts = [points[None]]
        for first in range(0, steps, CHUNK):
            parts.append(chunk(tf.constant(min(CHUNK, steps - first))).numpy())
            if log is not None:
                log(optimizer, first + len(parts[-1]), parts[-1][-1])
        return np.concatenate(parts).astype("float64")

    return run


def distance(path):
    """Euclidean distance of every point of `path` (..., 2) to the minimum (1, 1)."""
    return np.hypot(path[..., 0] - MINIMUM[0], path[..., 1] - MINIMUM[1])


def summarize(path):
    """What a run keeps: the fixed start's path, distances every CHUNK steps (and at the last
    step), divergence."""
    steps = np.unique(np.append(np.arange(0, len(path), CHUNK), len(path) - 1))
    with np.errstate(all="ignore"):
        diverged = ~np.isfinite(path).all(axis=(0, 2))
        distances = distance(path[steps])
    distances[:, diverged] = np.nan
    return {
        "fixed_path": path[:, 0],
        "steps": steps,
        "distances": distances,
        "diverged": diverged,
        "median_distance": _median(distances[-1, 1:]),
        "distance_501": float(distance(path[min(501, len(path) - 1), 0])),
        "diverged_starts": int(diverged[1:].sum()),
    }


def _median(values):
    """The median of the finite values, NaN if there is none."""
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else np.nan


def _logger(sinks):
    from optiscope.callbacks.publishing import Publisher

    publisher = Publisher(sinks, describe=True)

    def log(optimizer, step, points):
        with np.errstate(all="ignore"):
            d = distance(points)
            value = rosenbrock(*points[0])
        finite = np.isfinite(d)
        metrics = {
            "distance/fixed_start": d[0],
            "distance/median_random_starts": np.median(d[1:][finite[1:]]) if finite[1:].any()
            else np.nan,
            "loss/fixed_start": value,
            "diverged": float((~finite).sum()),
        }  # fmt: skip
        sinks.log_metrics(metrics, step)
        publisher.read(optimizer)

    return log


def _final(summary):
    return {"median_distance": summary["median_distance"],
            "final_distance": summary["distances"][-1, 0]}  # fmt: skip


def choose(grid):
    """The selection rule, over the random starts: the fewest diverged runs, then the lowest
    median final distance to (1, 1) of the others, then the smaller rate."""

    def key(lr):
        median = grid[lr]["median_distance"]
        return grid[lr]["diverged_starts"], np.inf if np.isnan(median) else median, lr

    return min(grid, key=key)


def run(config=Config(), tracker=None, options=None):
    """Runs every optimizer on the grid; returns a `harness.Result`."""
    from optiscope.experiments import harness

    options = options or harness.Options(track=False, progress=False)
    tracker = tracker or harness.Tracker(NAME, dataclasses.replace(options, track=False))
    points = starting_points(config)
    rows = optimizers(config)
    records, chosen = [], {}
    total = len(rows) * (len(config.learning_rates) + options.track) + len(POST_POINTS)
    with harness.progress(total, NAME, options.progress) as advance:
        for name, make in rows.items():
            runs = compile_runs(make, points)
            grid = {}
            for lr in config.learning_rates:
                params = {"setting": name, "learning_rate": lr}
                grid_label = f"{name}/{harness.lr_name(lr)}"
                with tracker.setting(grid_label, params, group="grid") as sinks:
                    grid[lr] = summarize(runs(lr, config.steps, _logger(sinks)))
                    sinks.log_hparams({"learning_rate": lr}, _final(grid[lr]))
                advance(f"{NAME}: {name} lr={lr:g}")
            lr = choose(grid)
            chosen[name] = grid[lr]
            records.append(_record(name, lr, grid, config))
            if options.track:  # the chosen rate again, as the run a person compares
                params = {"setting": name, "learning_rate": lr, "rule": RULE}
                with tracker.setting(name, params) as sinks:
                    runs(lr, config.steps, _logger(sinks))
                    sinks.log_hparams({"learning_rate": lr}, _final(grid[lr]))
                advance(f"{NAME}: {name} at the chosen lr={lr:g}")
        scans = {}
        for name in POST_POINTS:
            scans[name] = scan_as_published(name, config)
            record, chosen[label(name, True)] = _as_published_run(
                name, scans[name], points, tracker, config
            )
            records.append(record)
            advance(f"{NAME}: {name}, {AS_PUBLISHED}")
    return harness.Result(
        experiment=NAME,
        records=records,
        columns=[
            "optimizer",
            "variant",
            "learning_rate",
            *(f"step {s}" for s in _report_steps(config)),
            "final_distance",
            "median_distance",
            "best_distance",
            "diverged",
        ],
        reference=_reference(records, config),
        reference_columns=REFERENCE_COLUMNS + [_published_column(r) for r in _published(records)],
        notes=_notes(records, config) + _as_published_notes(records, scans, config),
        figures={
            "trajectories": plot_trajectories(chosen, records, config),
            "distances": plot_distances(chosen, records, config),
            "as_published": plot_as_published(records, config),
        },
    )


def label(name, published=False):
    """A row's name: the optimizer, with ", as published" for the post's own code."""
    return f"{name}, {AS_PUBLISHED}" if published else name


def _label(record):
    return label(record["optimizer"], record.get("variant") == "as_published")


def _published(records):
    return [r for r in records if r.get("variant") == "as_published"]


def _paper(records):
    return [r for r in records if r.get("variant") != "as_published"]


def scan_as_published(name, config):
    """The post's `name` from the post's start at every rate of the fine grid: `{"rates",
    "path"}` with the path (steps + 1, rates, 2) and, per rate, the distance to (1, 1) and to
    the post's point after 501 steps, and whether it diverged."""
    import keras

    from optiscope.experiments import as_published

    rates = config.as_published_rates()
    path = as_published.scan(
        as_published.ROSENBROCK[name], rates, config.start, config.steps,
        lambda x, y: rosenbrock(x, y, xp=keras.ops),
    )  # fmt: skip
    at = min(501, config.steps)
    target = POST_POINTS[name][501]
    with np.errstate(all="ignore"):
        error = np.hypot(path[at, :, 0] - target[0], path[at, :, 1] - target[1])
        diverged = ~np.isfinite(path).all(axis=(0, 2))
        distance_501 = distance(path[at])
    return {
        "rates": rates,
        "path": path,
        "error_501": np.where(diverged, np.nan, error),
        "distance_501": np.where(diverged, np.nan, distance_501),
        "diverged": diverged,
    }


def choose_as_published(scanned):
    """The rule for the post's rows: the rate whose point after 501 steps from the post's
    start is nearest the post's (diverged rates excluded; ties: the smaller rate)."""
    error = np.nan_to_num(scanned["error_501"], nan=np.inf)
    return int(np.argmin(error))


def _as_published_run(name, scanned, points, tracker, config):
    """The chosen rate of the post's `name`, re-run as a tracked setting from every start
    with the optimizer class; returns its record and summary."""
    from optiscope.experiments import as_published

    index = choose_as_published(scanned)
    lr = scanned["rates"][index]
    runs = compile_runs(as_published.ROSENBROCK[name], points)
    params = {"optimizer": name, "variant": "as_published", "learning_rate": lr,
              **dataclasses.asdict(config)}  # fmt: skip
    sinks = tracker.setting(label(name, True), params, tags={"optiscope.variant": "as_published"})
    summary = summarize(runs(lr, config.steps, _logger(sinks)))
    sinks.log_hparams(
        {"optimizer": name, "variant": "as_published", "learning_rate": lr},
        {"median_distance": summary["median_distance"],
         "final_distance": summary["distances"][-1, 0]},
    )  # fmt: skip
    sinks.close()
    record = _record(name, lr, {lr: summary}, config)
    record["variant"] = "as_published"
    record["rule"] = "fine grid: step-501 point nearest the post's"
    record["points"] = {str(s): record[f"step {s}"] for s in REPORT_STEPS if s <= config.steps}
    record["grid"] = [
        {"learning_rate": rate, "error_501": float(e), "distance_501": float(d),
         "diverged": bool(x)}
        for rate, e, d, x in zip(scanned["rates"], scanned["error_501"],
                                 scanned["distance_501"], scanned["diverged"], strict=True)
    ]  # fmt: skip
    return record, summary


def _published_column(record):
    return f"{record['optimizer']}, as published (lr {record['learning_rate']:.4g})"


def _reference(records, config):
    """The post's table, beside it the as-published rows' (x, y, f) at the same steps."""
    rows = []
    for row in REFERENCE:
        step = row["step"]
        if step > config.steps:
            continue
        row = dict(row)
        for record in _published(records):
            if step == 0:
                x, y = config.start
                cell = f"({x}, {y}), distance {np.hypot(x - 1, y - 1):.2f}"
            else:
                x, y, f = record["points"][str(step)]
                cell = f"({x:.2f}, {y:.2f}, {f:.2f})"
            row[_published_column(record)] = cell
        rows.append(row)
    return rows


def as_published_errors(records):
    """{optimizer: largest |x - post's x|, |y - post's y| over the post's table} of the
    as-published rows (steps the run reached)."""
    errors = {}
    for record in _published(records):
        post = POST_POINTS[record["optimizer"]]
        gaps = [
            max(abs(record["points"][str(s)][0] - x), abs(record["points"][str(s)][1] - y))
            for s, (x, y) in post.items()
            if str(s) in record["points"]
        ]
        if gaps:
            errors[record["optimizer"]] = max(gaps)
    return errors


def _as_published_notes(records, scans, config):
    published = {r["optimizer"]: r for r in _published(records)}
    if not published:
        return []
    low, high, per_decade = config.as_published_grid
    errors = as_published_errors(records)
    chosen = ", ".join(
        f"{name} lr {r['learning_rate']:.4g}"
        + (f" (largest gap to the post's x or y: {errors[name]:.3f})" if name in errors else "")
        for name, r in published.items()
    )
    notes = [
        f"As published: the post's own PowerSign and AddSign (alpha built from beta, so alpha "
        f"= beta = 0.5; m = max(beta*m + 1e-7, |g|), so sign(m) = +1 always) and TensorFlow "
        f"1's RMSProp (decay 0.9, epsilon 1e-10 inside the square root, mean square "
        f"initialised to ones), float32, from the post's start. Rule: on the log grid "
        f"{low:g} .. {high:g} with {per_decade} rates per decade, the rate whose point after "
        f"501 steps is nearest the post's (x, y); the other steps are predictions. Chosen: "
        f"{chosen}."
    ]
    power = published.get("PowerSign")
    if power is None:
        return notes
    scanned = scans["PowerSign"]
    index = choose_as_published(scanned)
    lr = scanned["rates"][index]
    path = scanned["path"][:, index]
    gx, gy = _gradient(*config.start)
    first = "; ".join(
        f"after {s}: ({path[s, 0]:.2f}, {path[s, 1]:.2f}), distance {distance(path[s]):.2f}"
        for s in range(1, min(6, config.steps + 1))
    )
    rates = np.asarray(scanned["rates"])
    near = (rates >= lr / 2) & (rates <= lr * 2)
    diverged = int(scanned["diverged"][near].sum())
    missed = int((scanned["distance_501"][near] >= VALLEY).sum())
    reached = int(near.sum()) - diverged - missed
    paper = next((r for r in _paper(records) if r["optimizer"] == "PowerSign"), None)
    at = min(501, config.steps)
    contrast = (
        f" The paper's PowerSign at its tuned lr {paper['learning_rate']:g} is "
        f"{paper['distance_501']:.3g} from (1, 1) after {at} steps, the post's code at lr "
        f"{lr:.4g} {power['distance_501']:.3g}."
        if paper
        else ""
    )
    notes.append(
        "Where the post's 'extremely fast early convergence' of PowerSign comes from: with "
        "alpha = 0.5 and sign(m) = +1 its update is lr * g * 0.5^sign(g), i.e. gradient "
        "descent at 2 lr on every coordinate whose gradient is negative and lr/2 where it is "
        "positive (AddSign: 1.5 lr and 0.5 lr, the other way round); no sign agreement is "
        f"involved. From ({config.start[0]}, {config.start[1]}) the gradient is "
        f"({gx:.0f}, {gy:.0f}), both negative, so the first step moves (x, y) by "
        f"2 lr * |g| = ({2 * lr * abs(gx):.2f}, {2 * lr * abs(gy):.2f}), across the whole "
        f"valley; the first steps at lr {lr:.4g}: {first}. Landing near (1, 1) is luck of "
        f"the rate: of the {int(near.sum())} grid rates within a factor 2 of it "
        f"({lr / 2:.3g} .. {lr * 2:.3g}), {reached} are within {VALLEY:g} of (1, 1) after "
        f"{at} steps, {missed} are not and {diverged} diverge.{contrast}"
    )
    return notes


def _gradient(x, y):
    """The gradient of f at (x, y), in float64."""
    return -2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)


def _report_steps(config):
    return [s for s in REPORT_STEPS if s < config.steps] + [config.steps]


def _record(name, lr, grid, config):
    summary = grid[lr]
    path, final = summary["fixed_path"], summary["distances"][-1]
    record = {"optimizer": name, "variant": "", "learning_rate": lr}
    with np.errstate(all="ignore"):
        for step in _report_steps(config):
            x, y = path[step]
            record[f"step {step}"] = [float(x), float(y), float(rosenbrock(x, y))]
    random = final[1:]
    record.update(
        final_distance=float(final[0]),
        median_distance=summary["median_distance"],
        best_distance=float(np.nanmin(random)) if np.isfinite(random).any() else np.nan,
        diverged=f"{summary['diverged_starts']}/{config.starts}",
        fixed_start_diverged=bool(summary["diverged"][0]),
        distance_501=summary["distance_501"],
        median_distance_500=_median(summary["distances"][min(500, config.steps) // CHUNK, 1:]),
        grid=[
            {"learning_rate": rate, "median_distance": s["median_distance"],
             "diverged": s["diverged_starts"], "distance_501": s["distance_501"]}
            for rate, s in grid.items()
        ],
    )  # fmt: skip
    return record


def _notes(records, config):
    records = _paper(records)
    rates = ", ".join(f"{lr:g}" for lr in config.learning_rates)
    notes = [
        f"Protocol: {config.steps} steps from ({config.start[0]}, {config.start[1]}) and from "
        f"{config.starts} random starts uniform in [-{config.box:g}, {config.box:g}]^2 "
        f"(seed {config.seed}); learning rates {rates}. Rule: each optimizer keeps the rate with "
        "the fewest diverged (NaN/Inf) runs over the random starts, then the lowest median final "
        "distance to (1, 1) of the others, then the smaller rate; the post's start is not used "
        "for tuning. The table shows that rate from the post's start (step s = after s updates: "
        "(x, y, f)) and over the random starts (median and best final distance, diverged). "
        f"Other hyperparameters are the optimizers' defaults; momentum {config.momentum}.",
        "The post's table (Source's numbers) gives no hyperparameters, and its PowerSign/AddSign "
        "differ from the paper (m = max(beta*m + eps, |g|), so sign(m) is always +1, and beta "
        "passed where alpha was meant); ours follow the paper (Bello et al. 2017).",
    ]
    at = min(501, config.steps)
    early = {r["optimizer"]: r["distance_501"] for r in records}
    early_median = {r["optimizer"]: r["median_distance_500"] for r in records}
    early_best = {
        r["optimizer"]: min((d for g in r["grid"] if np.isfinite(d := g["distance_501"])),
                            default=np.nan)
        for r in records
    }  # fmt: skip
    if "PowerSign" in early:
        holds = _ranked(early)[0] == "PowerSign" and _ranked(early_median)[0] == "PowerSign"
        notes.append(
            "Claim 'PowerSign converges extremely fast early' "
            f"{'holds' if holds else 'does not hold'} here (it would need PowerSign closest to "
            "(1, 1) early, both from the post's start and over the random starts). Distance at "
            f"step {at} from the post's start: {_listing(early)}. Median distance at step "
            f"{min(500, config.steps) // CHUNK * CHUNK} over the random starts: "
            f"{_listing(early_median)}. Even with each "
            f"optimizer's rate chosen for its distance at step {at} from the post's start: "
            f"{_listing(early_best)}."
        )
    by = {r["optimizer"]: r for r in records}
    sgd, ema = by.get(f"SGD momentum {config.momentum}"), by.get("EMAMomentum")
    mu = config.momentum
    if sgd and ema and np.isclose(sgd["learning_rate"], ema["learning_rate"] * (1 - mu)):
        notes.append(
            f"EMAMomentum at lr {ema['learning_rate']:g} is SGD(lr * (1 - mu), momentum=mu) "
            "and the two rows chose rates in that ratio: final distances from the "
            f"post's start {ema['final_distance']:.6g} and {sgd['final_distance']:.6g}."
        )
    failed = [r["optimizer"] for r in records if r["fixed_start_diverged"]]
    if failed:
        notes.append(f"Diverged from the post's start at the chosen rate: {', '.join(failed)}.")
    return notes


def _ranked(values):
    return sorted(values, key=lambda name: (np.nan_to_num(values[name], nan=np.inf), name))


def _listing(values):
    return ", ".join(f"{name} {values[name]:.3g}" for name in _ranked(values))


def _contour(ax, extent):
    import matplotlib.colors as colors

    xs = np.linspace(extent[0], extent[1], 300)
    ys = np.linspace(extent[2], extent[3], 300)
    x, y = np.meshgrid(xs, ys)
    levels = np.logspace(-3, 4.5, 31)
    return ax.contourf(
        x, y, rosenbrock(x, y) + 1e-3, levels=levels, norm=colors.LogNorm(), cmap="viridis"
    )


def plot_trajectories(chosen, records, config):
    """Each optimizer's path from the post's start over the contour of log f, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extent = (-3.0, 3.0, -2.5, 8.0)
    columns = 3
    rows = -(-len(records) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.0 * columns + 1, 4.2 * rows), sharex=True, sharey=True,
        squeeze=False, layout="constrained",
    )  # fmt: skip
    for ax, record in zip(axes.flat, records, strict=False):
        filled = _contour(ax, extent)
        path = chosen[_label(record)]["fixed_path"]
        ax.plot(path[:, 0], path[:, 1], color="white", lw=1.2)
        ax.plot(*path[0], "o", color="white", ms=5)
        ax.plot(*MINIMUM, "*", color="red", ms=10)
        ax.set(xlim=extent[:2], ylim=extent[2:])
        ax.set_title(f"{_label(record)}\nlr {record['learning_rate']:.4g}", fontsize=10)
    for ax in axes.flat[len(records) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("x")
    for ax in axes[:, 0]:
        ax.set_ylabel("y")
    figure.colorbar(filled, ax=axes, label="f(x, y) + 1e-3 (log scale)", shrink=0.6)
    figure.suptitle(
        f"Paths from ({config.start[0]}, {config.start[1]}), {config.steps} steps, at each "
        "optimizer's chosen rate (white dot: start, red star: minimum; view clipped)"
    )
    return figure


def plot_distances(chosen, records, config):
    """Distance to (1, 1) against step: from the post's start (every step), and the median
    (with the interquartile band) over the random starts (every CHUNK steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(15, 4.8), sharey=True, layout="constrained")
    for record in records:
        summary = chosen[_label(record)]
        name = f"{_label(record)} (lr {record['learning_rate']:.4g})"
        with np.errstate(all="ignore"):
            fixed = distance(summary["fixed_path"])
        style = "--" if record.get("variant") == "as_published" else "-"
        (line,) = left.plot(np.arange(len(fixed)), fixed, style, label=name, lw=1.2)
        random = summary["distances"][:, 1:]
        with np.errstate(all="ignore"):
            low, mid, high = np.nanpercentile(random, [25, 50, 75], axis=1)
        right.plot(summary["steps"], mid, color=line.get_color())
        right.fill_between(summary["steps"], low, high, color=line.get_color(), alpha=0.12)
    left.set(title=f"from ({config.start[0]}, {config.start[1]}), every step", xlabel="step",
             ylabel="distance to (1, 1)", yscale="log")  # fmt: skip
    right.set(title=f"{config.starts} random starts: median and interquartile range, every {CHUNK}",
              xlabel="step", yscale="log")  # fmt: skip
    figure.legend(loc="outside right center", fontsize=8)
    return figure


def plot_as_published(records, config):
    """The post's optimizers as its code ran: distance to (1, 1) after 501 steps from the
    post's start against the learning rate (fine grid), the chosen rate marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
    at = min(501, config.steps)
    for record in _published(records):
        grid = record["grid"]
        rates = [g["learning_rate"] for g in grid]
        (line,) = ax.plot(rates, [g["distance_501"] for g in grid], ".-", ms=3, lw=1,
                          label=f"{record['optimizer']}, as published")  # fmt: skip
        ax.plot(record["learning_rate"], record["distance_501"], "o", ms=8, mfc="none",
                color=line.get_color())  # fmt: skip
    for record in _paper(records):
        if record["optimizer"] == "PowerSign":
            grid = record["grid"]
            ax.plot([g["learning_rate"] for g in grid], [g["distance_501"] for g in grid], "k:",
                    marker="x", ms=5, lw=1, label="PowerSign (paper), its grid")  # fmt: skip
    ax.axhline(VALLEY, color="gray", ls=":", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="learning rate",
           ylabel=f"distance to (1, 1) after {at} steps",
           title=f"From ({config.start[0]}, {config.start[1]}): the post's code by learning "
                 "rate (circles: chosen; missing points: diverged)")  # fmt: skip
    ax.legend(fontsize=8)
    return figure
