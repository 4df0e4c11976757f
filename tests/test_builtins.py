"""The instrumentation finds the slots of Keras' built-in optimizers and of user-defined ones.

The slots are looked up independently, through each optimizer's own attributes (`momentums`,
`_velocities`, ...) and through the names Keras gives slot variables, and their norms are
recomputed in NumPy; the gradients are given, so the other statistics are checked too.
"""

import keras
import numpy as np
import pytest
from backends import compiled_apply
from keras import ops

from optiscope.optimizers import (
    Instrumented,
    InstrumentedAdagrad,
    InstrumentedAdam,
    InstrumentedAdamW,
    InstrumentedLion,
    InstrumentedRMSprop,
    InstrumentedSGD,
    instrument,
)

EPS = 1e-12
RTOL = 1e-5
ATOL = 1e-8

# name -> (provided class, Keras class, arguments, {slot name: attribute holding its list})
BUILTINS = {
    "sgd": (InstrumentedSGD, keras.optimizers.SGD, {"learning_rate": 0.1}, {}),
    "sgd_momentum": (
        InstrumentedSGD,
        keras.optimizers.SGD,
        {"learning_rate": 0.1, "momentum": 0.9},
        {"momentum": "momentums"},
    ),
    "sgd_nesterov": (
        InstrumentedSGD,
        keras.optimizers.SGD,
        {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True},
        {"momentum": "momentums"},
    ),
    "adam": (
        InstrumentedAdam,
        keras.optimizers.Adam,
        {"learning_rate": 0.1},
        {"momentum": "_momentums", "velocity": "_velocities"},
    ),
    "adam_amsgrad": (
        InstrumentedAdam,
        keras.optimizers.Adam,
        {"learning_rate": 0.1, "amsgrad": True},
        {"momentum": "_momentums", "velocity": "_velocities", "velocity_hat": "_velocity_hats"},
    ),
    "adamw": (
        InstrumentedAdamW,
        keras.optimizers.AdamW,
        {"learning_rate": 0.1, "weight_decay": 0.2},
        {"momentum": "_momentums", "velocity": "_velocities"},
    ),
    "rmsprop": (
        InstrumentedRMSprop,
        keras.optimizers.RMSprop,
        {"learning_rate": 0.1},
        {"velocity": "_velocities"},
    ),
    "rmsprop_momentum": (
        InstrumentedRMSprop,
        keras.optimizers.RMSprop,
        {"learning_rate": 0.1, "momentum": 0.5},
        {"velocity": "_velocities", "momentum": "_momentums"},
    ),
    "rmsprop_centered": (
        InstrumentedRMSprop,
        keras.optimizers.RMSprop,
        {"learning_rate": 0.1, "momentum": 0.5, "centered": True},
        {
            "velocity": "_velocities",
            "momentum": "_momentums",
            "average_gradient": "_average_gradients",
        },
    ),
    "adagrad": (
        InstrumentedAdagrad,
        keras.optimizers.Adagrad,
        {"learning_rate": 0.1},
        {"accumulator": "_accumulators"},
    ),
    "lion": (
        InstrumentedLion,
        keras.optimizers.Lion,
        {"learning_rate": 0.1},
        {"momentum": "_momentums"},
    ),
}
# The first-moment slot `sign_agreement` compares with, where the class declares one.
SIGN_REFERENCE = {name: "momentum" for name in ("adam", "adam_amsgrad", "adamw", "lion")}


def make_model():
    """Functional, so that the variable paths (`first/kernel`, ...) are the statistics' groups."""
    inputs = keras.Input((3,))
    first = keras.layers.Dense(4, name="first")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="second")(first), name="tiny")
    rng = np.random.default_rng(3)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.weights])
    return model


def gradients(model, step):
    """Fixed gradients of two scales; the sign reverses from the third step on."""
    rng = np.random.default_rng(10 + min(step, 2))
    grads = []
    for i, variable in enumerate(model.trainable_variables):
        g = rng.normal(scale=10.0**-i, size=variable.shape).astype("float32")
        g.ravel()[0] = 0.0  # an exact zero for zero_grad_fraction
        grads.append(g if step < 2 else -g)
    return grads


def run_steps(optimizer, model, steps):
    """Applies `steps` fixed gradients in a compiled function; records everything per step."""
    variables = model.trainable_variables
    optimizer.build(variables)
    apply, _ = compiled_apply(optimizer, variables)

    records = []
    for step in range(steps):
        old = [v.numpy() for v in variables]
        grads = gradients(model, step)
        lr = float(ops.convert_to_numpy(optimizer.learning_rate))
        apply(grads)
        records.append(
            {
                "grads": grads,
                "old": old,
                "new": [v.numpy() for v in variables],
                "lr": lr,
                "stats": optimizer.statistics(),
            }
        )
    return records


def slot_values(optimizer, slot_attributes):
    return {
        name: [np.array(v.numpy()) for v in getattr(optimizer, attribute)]
        for name, attribute in slot_attributes.items()
    }


def check_step(record, paths, slots, sign_reference=None, previous=None):
    """Every per-variable statistic of one step against NumPy."""
    stats = record["stats"]
    norm = np.linalg.norm
    grad_sq = update_sq = 0.0
    for i, path in enumerate(paths):
        g = record["grads"][i].astype(np.float64)
        update = record["new"][i].astype(np.float64) - record["old"][i]
        weight = record["new"][i].astype(np.float64)
        grad_sq += np.sum(g**2)
        update_sq += np.sum(update**2)
        expected = {
            "grad_norm": norm(g),
            "update_norm": norm(update),
            "weight_norm": norm(weight),
            "effective_lr": norm(update) / (norm(g) + EPS),
            "update_ratio": norm(update) / (norm(weight) + EPS),
            "zero_grad_fraction": np.mean(g == 0),
            "nonfinite_grad_count": 0.0,
        }
        if previous is not None:
            expected["sign_flip_fraction"] = np.mean(g * previous[i] < 0)
            expected["sign_flip_count"] = np.sum(g * previous[i] < 0)
        for slot, values in slots.items():
            expected[f"slot_norm/{slot}"] = norm(values[i].astype(np.float64))
        if sign_reference is not None:
            m = slots[sign_reference][i]
            expected["sign_agreement"] = np.mean(np.sign(g) == np.sign(m))
        for name, value in expected.items():
            np.testing.assert_allclose(
                stats[(name, path)].last, value, rtol=RTOL, atol=ATOL, err_msg=f"{name}/{path}"
            )
    np.testing.assert_allclose(stats[("learning_rate", None)].last, record["lr"], rtol=1e-6)
    np.testing.assert_allclose(stats[("global_grad_norm", None)].last, np.sqrt(grad_sq), rtol=RTOL)
    np.testing.assert_allclose(
        stats[("global_update_norm", None)].last, np.sqrt(update_sq), rtol=RTOL
    )


def slot_statistic_names(keys):
    """The `<slot>` of every `slot_norm/<slot>` statistic among `(statistic, group)` keys."""
    return {name.split("/", 1)[1] for name, _ in keys if name.startswith("slot_norm/")}


# --------------------------------------------------------------------------- built-ins
@pytest.mark.parametrize("name", sorted({v[1].__name__ for v in BUILTINS.values()}))
def test_instrument_returns_the_provided_class(name):
    provided, plain, _, _ = next(v for v in BUILTINS.values() if v[1].__name__ == name)
    assert instrument(plain) is provided
    assert instrument(provided) is provided
    assert issubclass(provided, Instrumented) and issubclass(provided, plain)
    assert provided.__name__ == f"Instrumented{name}"
    assert keras.saving.get_registered_name(provided) == f"optiscope>Instrumented{name}"


@pytest.mark.parametrize("name", list(BUILTINS))
def test_builtin_slots_are_found_for_every_variable(name):
    provided, plain, kwargs, slot_attributes = BUILTINS[name]
    optimizer = instrument(plain)(statistics="all", **kwargs)
    model = make_model()
    paths = [v.path for v in model.trainable_variables]
    records = run_steps(optimizer, model, steps=3)

    # The slots the optimizer really keeps, found by Keras' slot-variable naming.
    for slot, attribute in slot_attributes.items():
        slot_variables = getattr(optimizer, attribute)
        assert len(slot_variables) == len(paths)
        for path, variable in zip(paths, slot_variables, strict=True):
            assert variable.path.endswith(f"{path.replace('/', '_')}_{slot}")
    optimizer_paths = [v.path for v in optimizer.variables]
    for slot in ("momentum", "velocity", "velocity_hat", "average_gradient", "accumulator"):
        if slot not in slot_attributes:
            assert not any(p.endswith(f"_{slot}") for p in optimizer_paths), slot

    stats = records[-1]["stats"]
    assert slot_statistic_names(stats.keys()) == set(slot_attributes)
    for slot in slot_attributes:
        for path in paths:
            assert (f"slot_norm/{slot}", path) in stats
    assert (("sign_agreement", paths[0]) in stats) == (name in SIGN_REFERENCE)

    # Values, at the last step (slots are read after it).
    previous = records[-2]["grads"]
    slots = slot_values(optimizer, slot_attributes)
    check_step(records[-1], paths, slots, SIGN_REFERENCE.get(name), previous)
    assert records[-1]["stats"][("sign_flip_count", paths[0])].last > 0  # the sign reversed


@pytest.mark.parametrize("name", ["sgd_momentum", "adam", "rmsprop_centered", "lion"])
def test_builtin_statistics_match_at_every_step(name):
    _, plain, kwargs, slot_attributes = BUILTINS[name]
    optimizer = instrument(plain)(statistics="all", **kwargs)
    model = make_model()
    paths = [v.path for v in model.trainable_variables]
    variables = model.trainable_variables
    optimizer.build(variables)
    apply, _ = compiled_apply(optimizer, variables)

    previous = [np.zeros(v.shape, "float32") for v in variables]
    for step in range(4):
        old = [v.numpy() for v in variables]
        grads = gradients(model, step)
        apply(grads)
        record = {
            "grads": grads,
            "old": old,
            "new": [v.numpy() for v in variables],
            "lr": kwargs["learning_rate"],
            "stats": optimizer.statistics(),
        }
        check_step(
            record,
            paths,
            slot_values(optimizer, slot_attributes),
            SIGN_REFERENCE.get(name),
            previous,
        )
        previous = grads


@pytest.mark.parametrize(
    "options",
    [{"use_ema": True}, {"gradient_accumulation_steps": 2}],
    ids=["ema", "gradient_accumulation"],
)
def test_base_class_buffers_are_not_slots(options):
    optimizer = InstrumentedAdam(statistics="all", **options)
    model = make_model()
    optimizer.build(model.trainable_variables)
    assert slot_statistic_names(optimizer.statistic_keys) == {"momentum", "velocity"}


# --------------------------------------------------------------------------- custom optimizers
def _trace_step(optimizer, gradient, variable, learning_rate):
    index = optimizer._get_variable_index(variable)
    trace, peak = optimizer._traces[index], optimizer._peaks[index]
    g = ops.cast(gradient, variable.dtype)
    optimizer.assign(trace, ops.add(ops.multiply(trace, optimizer.beta), g))
    optimizer.assign(peak, ops.maximum(peak, ops.abs(g)))
    optimizer.assign_sub(variable, ops.multiply(ops.cast(learning_rate, variable.dtype), trace))


class TraceMomentum(keras.optimizers.Optimizer):
    """`trace <- beta * trace + g;  peak <- max(peak, |g|);  w <- w - lr * trace`."""

    def __init__(self, learning_rate=0.1, beta=0.5, name="trace_momentum", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta = beta

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._traces = self.add_optimizer_variables(var_list, "trace")
        self._peaks = [self.add_variable_from_reference(v, name="peak") for v in var_list]

    def update_step(self, gradient, variable, learning_rate):
        _trace_step(self, gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "beta": self.beta}


class DirectTraceMomentum(Instrumented, keras.optimizers.Optimizer):
    """The same rule, written against the mixin directly."""

    def __init__(self, learning_rate=0.1, beta=0.5, name="direct_trace_momentum", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta = beta

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._traces = self.add_optimizer_variables(var_list, "trace")
        self._peaks = [self.add_variable_from_reference(v, name="peak") for v in var_list]

    def update_step(self, gradient, variable, learning_rate):
        _trace_step(self, gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "beta": self.beta}


class AdamWithPeak(InstrumentedAdam):
    """A subclass of an instrumented built-in that adds a slot in its own `build`."""

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._peaks = self.add_optimizer_variables(var_list, "peak")

    def update_step(self, gradient, variable, learning_rate):
        super().update_step(gradient, variable, learning_rate)
        peak = self._peaks[self._get_variable_index(variable)]
        self.assign(peak, ops.maximum(peak, ops.abs(ops.cast(gradient, variable.dtype))))


TRACE_SLOTS = {"trace": "_traces", "peak": "_peaks"}


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: instrument(TraceMomentum)(**kw),
        lambda **kw: DirectTraceMomentum(**kw),
    ],
    ids=["instrument", "subclass"],
)
def test_custom_optimizer_slots_are_found(make):
    optimizer = make(statistics="all")
    model = make_model()
    paths = [v.path for v in model.trainable_variables]
    records = run_steps(optimizer, model, steps=3)
    stats = records[-1]["stats"]
    assert slot_statistic_names(stats.keys()) == {"trace", "peak"}
    for slot in TRACE_SLOTS:
        for path in paths:
            assert (f"slot_norm/{slot}", path) in stats
    check_step(
        records[-1], paths, slot_values(optimizer, TRACE_SLOTS), previous=records[-2]["grads"]
    )

    # The rule is untouched: the plain custom optimizer follows the same trajectory.
    plain_model = make_model()
    run_plain = TraceMomentum()
    plain_model_variables = plain_model.trainable_variables
    run_plain.build(plain_model_variables)
    for step in range(3):
        run_plain.apply(gradients(plain_model, step), plain_model_variables)
    for got, want in zip(model.get_weights(), plain_model.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)

    # Its configuration round-trips with the instrumentation's options.
    clone = type(optimizer).from_config(optimizer.get_config())
    assert clone.get_config() == optimizer.get_config()
    assert clone.get_config()["statistics"] == "all"


def test_instrument_custom_class_is_cached_and_registered():
    cls = instrument(TraceMomentum)
    assert instrument(TraceMomentum) is cls
    assert cls.__name__ == "InstrumentedTraceMomentum"
    assert issubclass(cls, TraceMomentum) and issubclass(cls, Instrumented)
    # Registered under the defining module, so it cannot clash with a built-in of that name.
    name = f"optiscope.{TraceMomentum.__module__}>InstrumentedTraceMomentum"
    assert keras.saving.get_registered_name(cls) == name
    assert keras.saving.get_registered_object(name) is cls


def test_subclass_of_instrumented_builtin_finds_its_own_slot():
    optimizer = AdamWithPeak(learning_rate=0.1, statistics="all")
    model = make_model()
    paths = [v.path for v in model.trainable_variables]
    records = run_steps(optimizer, model, steps=3)
    slots = {"momentum": "_momentums", "velocity": "_velocities", "peak": "_peaks"}
    assert slot_statistic_names(records[-1]["stats"].keys()) == set(slots)
    check_step(
        records[-1],
        paths,
        slot_values(optimizer, slots),
        sign_reference="momentum",
        previous=records[-2]["grads"],
    )


class EarlySlots(keras.optimizers.Optimizer):
    """Valid Keras: creates its slot before calling the base class's `build`."""

    def build(self, var_list):
        if self.built:
            return
        self._traces = [self.add_variable_from_reference(v, "trace") for v in var_list]
        super().build(var_list)

    def update_step(self, gradient, variable, learning_rate):
        trace = self._traces[self._get_variable_index(variable)]
        self.assign(trace, ops.add(ops.multiply(trace, 0.5), gradient))
        self.assign_sub(variable, ops.multiply(learning_rate, trace))


def test_slots_created_before_base_build_are_found():
    optimizer = instrument(EarlySlots)(learning_rate=0.1, statistics="all")
    model = make_model()
    paths = [v.path for v in model.trainable_variables]
    optimizer.build(model.trainable_variables)
    assert slot_statistic_names(optimizer.statistic_keys) == {"trace"}
    for path in paths:
        assert ("slot_norm/trace", path) in optimizer.statistic_keys


@pytest.fixture
def restored_registry():
    """Undoes registrations a test makes in Keras' global serialisation registry."""
    registry = keras.saving.get_custom_objects()
    saved = dict(registry)
    yield
    registry.clear()
    registry.update(saved)


def test_instrumenting_a_same_named_class_keeps_the_builtin_loadable(restored_registry):
    class Adam(keras.optimizers.Adam):
        """A user's variant that happens to share the built-in's name."""

    custom = instrument(Adam)
    assert custom is not InstrumentedAdam
    builtin_name = keras.saving.get_registered_name(InstrumentedAdam)
    # A `.keras` file that names the built-in must still load the built-in.
    assert keras.saving.get_registered_object(builtin_name) is InstrumentedAdam
    custom_name = keras.saving.get_registered_name(custom)
    assert custom_name != builtin_name
    assert keras.saving.get_registered_object(custom_name) is custom
