"""The instrumentation's statistics, recomputed in NumPy while `model.fit` runs.

A callback records, at every batch, the variables before and after the step and the optimizer's
slots (found through the optimizer's own attributes, not through the instrumentation). The
gradient is recomputed in closed form from the pre-step weights of a small ReLU network, so every
statistic can be recomputed from its formula and compared with what `optimizer.statistics()`
reports for the same window.
"""

import dataclasses
from collections.abc import Callable

import keras
import numpy as np
import pytest
from backends import compiled_apply

from optiscope.optimizers import (
    Instrumented,
    InstrumentedAdagrad,
    InstrumentedAdam,
    InstrumentedAdamW,
    InstrumentedLion,
    InstrumentedRMSprop,
    InstrumentedSGD,
    SignAveraging,
)

FEATURES = 8
HIDDEN = 4
SAMPLES = 64
BATCH = 8
EPOCHS = 3
STEPS = SAMPLES // BATCH * EPOCHS  # 24
EPS = 1e-12  # the epsilon in effective_lr and update_ratio
RTOL = 1e-5
ATOL = 1e-8


# --------------------------------------------------------------------------- model and data
def make_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype("float32")
    y = (x @ rng.normal(size=(FEATURES, 1)) + 0.3).astype("float32")
    return x, y


def initial_weights():
    rng = np.random.default_rng(1)
    return [
        rng.normal(scale=0.5, size=(FEATURES, HIDDEN)).astype("float32"),
        # The last hidden unit is dead (pre-activation always < 0): its gradients are exactly 0.
        np.array([0.1, 0.0, -0.1, -50.0], "float32"),
        rng.normal(scale=0.5, size=(HIDDEN, 1)).astype("float32"),
        np.array([0.2], "float32"),
    ]


def make_model(optimizer):
    """Functional, so that the variable paths (`hidden/kernel`, ...) are the statistics' groups."""
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(HIDDEN, activation="relu", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(hidden), name="net")
    model.set_weights(initial_weights())
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    return model


def mlp_gradients(weights, x, y):
    """Closed-form gradient of the mean squared error of Dense(relu) -> Dense, in float64."""
    k1, b1, k2, b2 = (np.asarray(w, np.float64) for w in weights)
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    pre = x @ k1 + b1
    hidden = np.maximum(pre, 0.0)
    d_out = 2.0 * (hidden @ k2 + b2 - y) / len(x)
    d_pre = (d_out @ k2.T) * (pre > 0)
    return [x.T @ d_pre, d_pre.sum(axis=0), hidden.T @ d_out, d_out.sum(axis=0)]


def values_of(variables):
    return [np.array(v.numpy()) for v in variables]


# --------------------------------------------------------------------------- optimizers under test
@dataclasses.dataclass(frozen=True)
class Case:
    """An instrumented optimizer, its learning rate per 0-based step, and where its slots are."""

    name: str
    make: Callable[..., Instrumented]
    learning_rate: Callable[[int], float]
    slots: dict  # slot name -> optimizer attribute holding the per-variable list
    sign_reference: str | None
    first_slot_rule: Callable  # (slot before, gradient, lr) -> slot after, for the oracle check


def _adam_lr(t):
    return 0.02 * 0.5 ** (t / 5)


CASES = [
    Case(
        "adam",
        lambda **kw: InstrumentedAdam(
            learning_rate=keras.optimizers.schedules.ExponentialDecay(0.02, 5, 0.5), **kw
        ),
        _adam_lr,
        {"momentum": "_momentums", "velocity": "_velocities"},
        "momentum",
        lambda m, g, lr: 0.9 * m + 0.1 * g,
    ),
    Case(
        "sgd_momentum",
        lambda **kw: InstrumentedSGD(learning_rate=0.01, momentum=0.9, **kw),
        lambda t: 0.01,
        {"momentum": "momentums"},
        None,
        lambda m, g, lr: 0.9 * m - lr * g,
    ),
    Case(
        "sign_averaging",
        lambda **kw: SignAveraging(learning_rate=0.05, **kw),
        lambda t: 0.05,
        {"prev_grad": "_prev_grads", "prev_value": "_prev_values"},
        None,
        lambda prev_grad, g, lr: g,
    ),
]


class Recorder(keras.callbacks.Callback):
    """Records weights before/after each step and the slots after it; reads every `every` steps."""

    def __init__(self, slot_attributes, every):
        super().__init__()
        self.slot_attributes = slot_attributes
        self.every = every
        self.batches, self.before, self.after, self.slots = [], [], [], []
        self.reads, self.read_steps = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.batches.append(batch)
        self.before.append(values_of(self.model.trainable_variables))

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        self.after.append(values_of(self.model.trainable_variables))
        self.slots.append(
            {
                name: values_of(getattr(optimizer, attribute))
                for name, attribute in self.slot_attributes.items()
            }
        )
        if self.every and len(self.after) % self.every == 0:
            self.read(optimizer)

    def read(self, optimizer, **kwargs):
        self.reads.append(optimizer.statistics(**kwargs))
        self.read_steps.append(len(self.after))


def train(case, every, epochs=EPOCHS, **options):
    optimizer = case.make(statistics="all", **options)
    model = make_model(optimizer)
    x, y = make_data()
    recorder = Recorder(case.slots, every)
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=[recorder])
    if recorder.read_steps[-1:] != [len(recorder.after)]:
        recorder.read(optimizer)  # the steps after the last periodic read
    return model, optimizer, recorder


# --------------------------------------------------------------------------- NumPy reference
def step_records(case, recorder):
    """Per step: gradient (closed form), previous gradient, old/new weights, slots, lr."""
    x, y = make_data()
    records = []
    previous = None
    for t, batch in enumerate(recorder.batches):
        rows = slice(batch * BATCH, (batch + 1) * BATCH)
        grads = mlp_gradients(recorder.before[t], x[rows], y[rows])
        if previous is None:
            previous = [np.zeros_like(g) for g in grads]
        records.append(
            {
                "grads": grads,
                "previous": previous,
                "old": recorder.before[t],
                "new": recorder.after[t],
                "slots": recorder.slots[t],
                "lr": case.learning_rate(t),
            }
        )
        previous = grads
    return records


def check_gradient_oracle(case, records):
    """The closed-form gradient is the one the optimizer used (via its first slot's rule)."""
    slot = next(iter(case.slots))
    before = [np.zeros_like(w) for w in records[0]["old"]]
    for t, record in enumerate(records):
        for i, g in enumerate(record["grads"]):
            np.testing.assert_allclose(
                record["slots"][slot][i],
                case.first_slot_rule(before[i], g, record["lr"]),
                rtol=1e-4,
                atol=1e-7,
                err_msg=f"slot {slot} of variable {i} at step {t + 1}",
            )
        before = record["slots"][slot]


def _flat(arrays, members):
    return np.concatenate([np.ravel(np.asarray(arrays[i], np.float64)) for i in members])


def expected_values(record, groups, slot_names, sign_reference):
    """`{(statistic, group): value}` of one step, each group's members as one flat vector."""
    values = {}
    norm = np.linalg.norm
    for group, members in groups.items():
        g = _flat(record["grads"], members)
        previous = _flat(record["previous"], members)
        old = _flat(record["old"], members)
        new = _flat(record["new"], members)
        grad_norm, update_norm, weight_norm = norm(g), norm(new - old), norm(new)
        flips = g * previous < 0
        values[("grad_norm", group)] = grad_norm
        values[("update_norm", group)] = update_norm
        values[("weight_norm", group)] = weight_norm
        values[("effective_lr", group)] = update_norm / (grad_norm + EPS)
        values[("update_ratio", group)] = update_norm / (weight_norm + EPS)
        values[("zero_grad_fraction", group)] = np.mean(g == 0)
        values[("nonfinite_grad_count", group)] = np.sum(~np.isfinite(g))
        values[("sign_flip_fraction", group)] = np.mean(flips)
        values[("sign_flip_count", group)] = np.sum(flips)
        for slot in slot_names:
            values[(f"slot_norm/{slot}", group)] = norm(_flat(record["slots"][slot], members))
        if sign_reference is not None:
            m = _flat(record["slots"][sign_reference], members)
            values[("sign_agreement", group)] = np.mean(np.sign(g) == np.sign(m))
    everything = range(len(record["grads"]))
    values[("learning_rate", None)] = record["lr"]
    values[("global_grad_norm", None)] = norm(_flat(record["grads"], everything))
    values[("global_update_norm", None)] = norm(
        _flat(record["new"], everything) - _flat(record["old"], everything)
    )
    return values


def groups_of(paths, aggregation):
    if aggregation == "variable":
        return {path: [i] for i, path in enumerate(paths)}
    if aggregation == "global":
        return {"global": list(range(len(paths)))}
    groups = {}
    for i, path in enumerate(paths):
        groups.setdefault(path.rsplit("/", 1)[0], []).append(i)
    return groups


def check_reads(reads, read_steps, per_step):
    """Each read's last/mean/max cover its window; total covers every step since the start."""
    keys = list(per_step[0])
    series = {key: np.array([values[key] for values in per_step], np.float64) for key in keys}
    start = 0
    for stats, end in zip(reads, read_steps, strict=True):
        assert stats.step == end
        assert stats.steps == end - start
        assert sorted(stats.keys(), key=repr) == sorted(keys, key=repr)
        for key in keys:
            window = series[key][start:end]
            summary = stats[key]
            np.testing.assert_allclose(
                [summary.last, summary.mean, summary.max, summary.total],
                [window[-1], window.mean(), window.max(), series[key][:end].sum()],
                rtol=RTOL,
                atol=ATOL,
                err_msg=f"{key} (last, mean, max, total) read at step {end}",
            )
            assert summary.first_nonfinite_step is None, key
        assert stats.first_nonfinite() is None
        start = end


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    ("aggregation", "every"),
    [("variable", 1), ("variable", 10), ("layer", 10), ("global", 1)],
)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_every_statistic_matches_numpy(case, aggregation, every):
    model, optimizer, recorder = train(case, every, aggregation=aggregation)
    assert len(recorder.after) == STEPS
    expected_read_steps = list(range(every, STEPS + 1, every))
    if expected_read_steps[-1] != STEPS:
        expected_read_steps.append(STEPS)
    assert recorder.read_steps == expected_read_steps

    records = step_records(case, recorder)
    check_gradient_oracle(case, records)
    paths = [v.path for v in model.trainable_variables]
    assert paths == ["hidden/kernel", "hidden/bias", "out/kernel", "out/bias"]
    groups = groups_of(paths, aggregation)
    per_step = [
        expected_values(record, groups, sorted(case.slots), case.sign_reference)
        for record in records
    ]
    check_reads(recorder.reads, recorder.read_steps, per_step)

    # The run exercises the interesting branches: dead units, and (for the rules that
    # overshoot) sign flips.
    last = recorder.reads[-1]
    assert sum(last[("zero_grad_fraction", g)].total for g in groups) > 0
    if case.name == "sign_averaging":
        assert sum(last[("sign_flip_count", g)].total for g in groups) > 0


def test_layer_and_global_groups_combine_the_variable_values():
    """The same run seen per layer / globally equals the NumPy combination of its variables."""
    case = CASES[0]
    runs = {agg: train(case, every=6, aggregation=agg) for agg in ("variable", "layer", "global")}
    variable_stats = runs["variable"][2].reads
    for aggregation in ("layer", "global"):
        model, _, recorder = runs[aggregation]
        paths = [v.path for v in model.trainable_variables]
        groups = groups_of(paths, aggregation)
        for per_variable, grouped in zip(variable_stats, recorder.reads, strict=True):
            for group, members in groups.items():
                member_paths = [paths[i] for i in members]

                def last(name, stats=per_variable, member_paths=member_paths):
                    return np.array([stats[(name, p)].last for p in member_paths])

                sizes = np.array([np.prod(model.trainable_variables[i].shape) for i in members])
                sq = {n: np.sum(last(n) ** 2) for n in ("grad_norm", "update_norm", "weight_norm")}
                expected = {
                    "grad_norm": np.sqrt(sq["grad_norm"]),
                    "update_norm": np.sqrt(sq["update_norm"]),
                    "weight_norm": np.sqrt(sq["weight_norm"]),
                    "effective_lr": np.sqrt(sq["update_norm"]) / (np.sqrt(sq["grad_norm"]) + EPS),
                    "update_ratio": np.sqrt(sq["update_norm"]) / (np.sqrt(sq["weight_norm"]) + EPS),
                    "zero_grad_fraction": np.sum(last("zero_grad_fraction") * sizes) / sizes.sum(),
                    "sign_flip_fraction": np.sum(last("sign_flip_fraction") * sizes) / sizes.sum(),
                    "sign_agreement": np.sum(last("sign_agreement") * sizes) / sizes.sum(),
                    "nonfinite_grad_count": np.sum(last("nonfinite_grad_count")),
                    "sign_flip_count": np.sum(last("sign_flip_count")),
                    "slot_norm/momentum": np.sqrt(np.sum(last("slot_norm/momentum") ** 2)),
                    "slot_norm/velocity": np.sqrt(np.sum(last("slot_norm/velocity") ** 2)),
                }
                for name, value in expected.items():
                    np.testing.assert_allclose(
                        grouped[(name, group)].last, value, rtol=RTOL, atol=ATOL, err_msg=name
                    )
            for name in ("learning_rate", "global_grad_norm", "global_update_norm"):
                np.testing.assert_allclose(
                    grouped[(name, None)].last, per_variable[(name, None)].last, rtol=RTOL
                )
        assert {group for _, group in recorder.reads[-1]} == {*groups, None}


# --------------------------------------------------------------------------- include / exclude
PATHS = ("hidden/kernel", "hidden/bias", "out/kernel", "out/bias")


def _two_steps(**options):
    optimizer = InstrumentedAdam(learning_rate=0.01, statistics="all", **options)
    model = make_model(optimizer)
    x, y = make_data()
    for step in range(2):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        model.train_on_batch(x[rows], y[rows])
    return optimizer.statistics()


@pytest.fixture(scope="module")
def unfiltered_statistics():
    return _two_steps()


@pytest.mark.parametrize(
    ("options", "selected"),
    [
        ({"include": "hidden"}, ("hidden/kernel", "hidden/bias")),
        ({"exclude": "bias$"}, ("hidden/kernel", "out/kernel")),
        ({"include": ["out/kernel", "hidden/bias"]}, ("hidden/bias", "out/kernel")),
        ({"include": "kernel", "exclude": "^out"}, ("hidden/kernel",)),
    ],
)
def test_include_and_exclude_select_variable_paths(options, selected, unfiltered_statistics):
    stats = _two_steps(**options)
    groups = {group for _, group in stats} - {None}
    assert groups == set(selected)
    for (name, group), summary in stats.items():
        if group is None:
            continue
        reference = unfiltered_statistics[(name, group)]
        # Selecting fewer variables changes nothing about the selected ones.
        np.testing.assert_allclose(
            [summary.last, summary.mean, summary.max, summary.total],
            [reference.last, reference.mean, reference.max, reference.total],
            rtol=1e-6,
            err_msg=f"{name}/{group}",
        )


@pytest.mark.parametrize(
    "options",
    [
        {"include": "no_such_layer"},
        {"exclude": ".*"},
        {"include": "hidden", "exclude": "hidden"},
        {"include": ["nope", "nada"]},
    ],
)
def test_selection_matching_nothing_raises_at_build(options):
    optimizer = InstrumentedAdam(statistics="all", **options)
    model = make_model(optimizer)
    with pytest.raises(ValueError, match="include"):
        optimizer.build(model.trainable_variables)


def test_invalid_selection_arguments_raise_at_construction():
    with pytest.raises(ValueError, match="include"):
        InstrumentedAdam(include="(unclosed")
    with pytest.raises(TypeError, match="exclude"):
        InstrumentedAdam(exclude=[3])
    with pytest.raises(ValueError, match="aggregation"):
        InstrumentedAdam(aggregation="model")


# --------------------------------------------------------------------------- non-finite gradients
def test_nonfinite_gradient_in_fit_is_counted_and_dated():
    optimizer = InstrumentedSGD(learning_rate=0.01, statistics="all")
    model = make_model(optimizer)
    x, y = make_data()
    x, y = x[: 4 * BATCH].copy(), y[: 4 * BATCH]
    bad_step = 3  # 1-based: the third batch holds an infinite input
    x[(bad_step - 1) * BATCH + 1, 5] = np.inf
    recorder = Recorder({}, every=1)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[recorder])
    assert recorder.read_steps == [1, 2, 3, 4]

    for stats in recorder.reads[: bad_step - 1]:
        assert stats.first_nonfinite() is None
        assert all(stats[("nonfinite_grad_count", p)].last == 0 for p in PATHS)

    rows = slice((bad_step - 1) * BATCH, bad_step * BATCH)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in the reference too
        grads = mlp_gradients(recorder.before[bad_step - 1], x[rows], y[rows])
    stats = recorder.reads[bad_step - 1]
    affected = [p for p, g in zip(PATHS, grads, strict=True) if not np.all(np.isfinite(g))]
    assert affected  # the infinite input reaches the gradients
    for path, g in zip(PATHS, grads, strict=True):
        count = stats[("nonfinite_grad_count", path)]
        expected = int(np.sum(~np.isfinite(g)))
        assert (count.last > 0) == (expected > 0), path
        assert count.first_nonfinite_step is None  # the count itself is finite
        first = stats[("grad_norm", path)].first_nonfinite_step
        assert first == (bad_step if expected else None), path
    assert stats[("global_grad_norm", None)].first_nonfinite_step == bad_step
    step, name, group = stats.first_nonfinite()
    assert step == bad_step
    assert stats[(name, group)].first_nonfinite_step == bad_step
    # The date of the first non-finite value survives later reads.
    later = recorder.reads[bad_step]
    assert later[("grad_norm", affected[0])].first_nonfinite_step == bad_step
    assert later.first_nonfinite()[0] == bad_step


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_nonfinite_gradient_of_one_variable(compiled):
    a = keras.Variable(np.ones((2, 3), "float32"), name="a")
    b = keras.Variable(np.arange(4, dtype="float32"), name="b")
    optimizer = InstrumentedSGD(learning_rate=0.1, statistics="all")
    optimizer.build([a, b])

    def apply(grads):
        optimizer.apply(grads, [a, b])

    if compiled:
        apply, _ = compiled_apply(optimizer, [a, b])
    good_a = np.full((2, 3), 0.5, "float32")
    good_b = np.array([1.0, -1.0, 2.0, 0.0], "float32")
    bad_b = np.array([1.0, np.nan, np.inf, 0.0], "float32")

    apply([good_a, good_b])
    assert optimizer.statistics().first_nonfinite() is None
    apply([good_a, bad_b])
    stats = optimizer.statistics()
    assert stats[("nonfinite_grad_count", "b")].last == 2
    assert stats[("nonfinite_grad_count", "a")].last == 0
    assert stats[("grad_norm", "b")].first_nonfinite_step == 2
    assert stats[("grad_norm", "a")].first_nonfinite_step is None
    assert stats[("weight_norm", "a")].first_nonfinite_step is None
    assert stats[("global_grad_norm", None)].first_nonfinite_step == 2
    assert stats[("learning_rate", None)].first_nonfinite_step is None
    assert stats.first_nonfinite()[0] == 2
    assert stats[stats.first_nonfinite()[1:]].first_nonfinite_step == 2

    apply([good_a, good_b])
    stats = optimizer.statistics()
    assert stats[("nonfinite_grad_count", "b")].last == 0
    assert stats[("nonfinite_grad_count", "b")].total == 2  # cumulative since the start
    assert stats[("grad_norm", "b")].first_nonfinite_step == 2
    np.testing.assert_allclose(stats[("grad_norm", "b")].last, np.linalg.norm(good_b), rtol=RTOL)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"clipnorm": 0.1}, {"a": 0.1, "b": 0.1}),
        ({"global_clipnorm": 0.1}, {None: 0.1}),
        ({"clipvalue": 0.5}, {"a": 0.5 * np.sqrt(6), "b": np.sqrt(0.25 + 0.25 + 0.25)}),
    ],
    ids=["clipnorm", "global_clipnorm", "clipvalue"],
)
def test_grad_norm_is_of_the_clipped_gradient(options, expected):
    a = keras.Variable(np.ones((2, 3), "float32"), name="a")
    b = keras.Variable(np.zeros(4, "float32"), name="b")
    optimizer = InstrumentedSGD(learning_rate=1.0, statistics="all", **options)
    optimizer.apply(
        [np.full((2, 3), 3.0, "float32"), np.array([1.0, -2.0, 2.0, 0.0], "float32")], [a, b]
    )
    stats = optimizer.statistics()
    for group, value in expected.items():
        name = "global_grad_norm" if group is None else "grad_norm"
        assert stats[(name, group)].last == pytest.approx(value, rel=1e-6)
    # The update is lr times the clipped gradient, so effective_lr is exactly lr.
    for group in ("a", "b"):
        assert stats[("effective_lr", group)].last == pytest.approx(1.0, rel=1e-6)


@pytest.mark.filterwarnings("ignore:Gradients do not exist")
def test_variable_without_gradient_is_not_reported_nonfinite():
    """A head outside the loss gets no gradient (Keras skips it): no false alarm, true norms."""
    inputs = keras.Input((FEATURES,))
    trunk = keras.layers.Dense(HIDDEN, name="trunk")(inputs)
    outputs = {
        "main": keras.layers.Dense(1, name="main")(trunk),
        "aux": keras.layers.Dense(1, name="aux", bias_initializer="ones")(trunk),
    }
    model = keras.Model(inputs, outputs)
    optimizer = InstrumentedAdam(learning_rate=0.01, statistics="all")
    model.compile(optimizer=optimizer, loss={"main": "mse"}, jit_compile=False)
    x, y = make_data()
    aux_before = values_of(model.get_layer("aux").trainable_variables)
    model.fit(x, {"main": y, "aux": y}, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    stats = optimizer.statistics()

    assert stats.first_nonfinite() is None
    for key, summary in stats.items():
        values = [summary.last, summary.mean, summary.max, summary.total]
        assert np.all(np.isfinite(values)), (key, summary)
    for variable, before in zip(
        model.get_layer("aux").trainable_variables, aux_before, strict=True
    ):
        np.testing.assert_array_equal(variable.numpy(), before)  # never updated
        # weight_norm is ||w_new||, and w_new = w_old here.
        np.testing.assert_allclose(
            stats[("weight_norm", variable.path)].last, np.linalg.norm(before), rtol=RTOL
        )
        assert stats[("update_norm", variable.path)].last == 0


# --------------------------------------------------------------------------- reading
def test_reset_false_keeps_accumulating_and_empty_window_is_nan():
    optimizer = SignAveraging(learning_rate=0.05, statistics="all")
    model = make_model(optimizer)
    x, y = make_data()
    lasts = []
    for step in range(4):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        model.train_on_batch(x[rows], y[rows])
        stats = optimizer.statistics(reset=False)
        assert stats.steps == step + 1 and stats.step == step + 1
        lasts.append({key: summary.last for key, summary in stats.items()})

    stats = optimizer.statistics()  # reset=True: the window still covers all four steps
    assert stats.steps == 4
    for key, summary in stats.items():
        window = np.array([values[key] for values in lasts])
        np.testing.assert_allclose(
            [summary.mean, summary.max, summary.total],
            [window.mean(), window.max(), window.sum()],
            rtol=RTOL,
            atol=ATOL,
            err_msg=repr(key),
        )

    empty = optimizer.statistics()  # no step since the previous read
    assert empty.steps == 0 and empty.step == 4
    for key, summary in empty.items():
        assert np.isnan(summary.mean) and np.isnan(summary.max), key
        assert summary.last == stats[key].last, key
        assert summary.total == stats[key].total, key
    assert not optimizer.statistics(reset=False).steps

    model.train_on_batch(x[:BATCH], y[:BATCH])
    after = optimizer.statistics()
    assert after.steps == 1 and after.step == 5
    for key, summary in after.items():
        assert summary.mean == pytest.approx(summary.last, rel=1e-6, abs=1e-12), key
        assert summary.max == pytest.approx(summary.last, rel=1e-6, abs=1e-12), key


def test_statistics_before_build_raise():
    with pytest.raises(RuntimeError, match="built"):
        InstrumentedAdam().statistics()


# --------------------------------------------------------------------------- no effect on training
def _fit(optimizer, steps):
    model = make_model(optimizer)
    x, y = make_data()
    model.fit(x[: steps * BATCH], y[: steps * BATCH], batch_size=BATCH, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize(
    ("instrumented", "plain", "plain_variables"),
    [
        (
            lambda **kw: InstrumentedSGD(0.01, momentum=0.9, **kw),
            lambda: keras.optimizers.SGD(0.01, momentum=0.9),
            None,
        ),
        (
            lambda **kw: InstrumentedAdam(0.01, **kw),
            lambda: keras.optimizers.Adam(0.01),
            None,
        ),
        # No uninstrumented SignAveraging exists: iteration, learning rate, 2 slots per variable.
        (lambda **kw: SignAveraging(0.05, **kw), lambda: SignAveraging(0.05, statistics="all"), 10),
    ],
    ids=["sgd_momentum", "adam", "sign_averaging"],
)
def test_statistics_none_is_the_plain_optimizer(instrumented, plain, plain_variables):
    silent = instrumented(statistics=None)
    reference = plain()
    silent_model = _fit(silent, steps=6)
    reference_model = _fit(reference, steps=6)
    expected = plain_variables if plain_variables is not None else len(reference.variables)
    assert len(silent.variables) == expected
    assert not any("optiscope" in v.path for v in silent.variables)
    for got, want in zip(silent_model.get_weights(), reference_model.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    assert silent.statistic_keys == []
    with pytest.raises(ValueError, match="statistics=None"):
        silent.statistics()


BUILTINS = {
    "sgd": (InstrumentedSGD, keras.optimizers.SGD, {"learning_rate": 0.01}),
    "sgd_momentum": (InstrumentedSGD, keras.optimizers.SGD, {"momentum": 0.9}),
    "sgd_nesterov": (InstrumentedSGD, keras.optimizers.SGD, {"momentum": 0.9, "nesterov": True}),
    "adam": (InstrumentedAdam, keras.optimizers.Adam, {"learning_rate": 0.01}),
    "adamw": (InstrumentedAdamW, keras.optimizers.AdamW, {"weight_decay": 0.1}),
    "rmsprop": (InstrumentedRMSprop, keras.optimizers.RMSprop, {}),
    "rmsprop_centered": (
        InstrumentedRMSprop,
        keras.optimizers.RMSprop,
        {"momentum": 0.5, "centered": True},
    ),
    "adagrad": (InstrumentedAdagrad, keras.optimizers.Adagrad, {"learning_rate": 0.05}),
    "lion": (InstrumentedLion, keras.optimizers.Lion, {"learning_rate": 0.001}),
}


@pytest.mark.parametrize("name", list(BUILTINS))
def test_instrumentation_never_changes_the_trajectory(name):
    instrumented_class, plain_class, kwargs = BUILTINS[name]
    instrumented = instrumented_class(statistics="all", **kwargs)
    plain = plain_class(**kwargs)
    got = _fit(instrumented, steps=8)
    want = _fit(plain, steps=8)
    assert int(instrumented.iterations.numpy()) == int(plain.iterations.numpy()) == 8
    for a, b in zip(got.get_weights(), want.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    plain_paths = {v.path.split("/", 1)[1]: v for v in plain.variables}
    for variable in instrumented.variables:
        suffix = variable.path.split("/", 1)[1]
        if "optiscope" not in suffix:
            # Same slots, same values (model paths differ only by the optimizer's name).
            np.testing.assert_array_equal(variable.numpy(), plain_paths.pop(suffix).numpy())
    assert not plain_paths
    assert instrumented.statistics().steps == 8
