"""The optimizers' update rules against NumPy references, fused kernels and
Keras built-ins; sign decays; argument validation; configuration round trips."""

import copy
import functools
import json
import math
import re

import keras
import numpy as np
import pytest
import reference as R
from backends import compiled_apply
from keras import ops

from optiscope.optimizers import (
    AddSign,
    CosineSignDecay,
    EMAMomentum,
    LinearSignDecay,
    PowerSign,
    RestartSignDecay,
    SignAveraging,
)
from optiscope.optimizers.sign_decay import SignDecay

DTYPES = ["float32", "float64"]
RTOL = {"float32": 1e-6, "float64": 1e-12}

# Keras keeps the learning rate in a float32 variable whatever the variables' dtype, so a
# float64 comparison at 1e-12 needs a learning rate that float32 represents exactly. The other
# hyperparameters of the lockstep tests are exact in float32 too, so that these tests check
# the rules themselves; `test_float64_keeps_float64_hyperparameters` checks values that are not.
LR = 0.0625
BETA = 0.875
ALPHA = 0.75
MU = 0.75

# Two variables of very different scale and shape.
INITIAL = (
    np.array([1.5e-3, -2.5e-3, 0.75e-3]),
    np.array([[120.0, -80.0], [250.0, 45.0]]),
)
_DIRECTIONS = (np.array([2e-3, -1e-3, 4e-3]), np.array([[3.0, -5.0], [8.0, 0.5]]))
_MAGNITUDES = (1.0, 0.5, 2.0, 1.5, 3.0, 4.0, 2.5)
_REVERSAL = (np.array([-1.0, -1.0, 1.0]), np.array([[-1.0, 1.0], [-1.0, -1.0]]))


def gradient_steps(dtype):
    """Seven steps of gradients for `INITIAL`: four with one sign pattern, then three larger
    ones in which most (not all) elements reverse, so that sign(m) flips too; one element
    has a zero gradient at step 2."""
    steps = []
    for t, magnitude in enumerate(_MAGNITUDES):
        grads = [d * magnitude for d in _DIRECTIONS]
        if t >= 4:
            grads = [g * r for g, r in zip(grads, _REVERSAL, strict=True)]
        if t == 2:
            grads[0] = grads[0] * np.array([1.0, 0.0, 1.0])
        steps.append([g.astype(dtype) for g in grads])
    return steps


def assert_close(actual, expected, dtype, err_msg=""):
    """Relative comparison; the absolute tolerance is relative to the array's largest
    element, so an element passing near zero is not judged on its own relative error."""
    expected = np.asarray(expected)
    rtol = RTOL[dtype]
    atol = rtol * float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol, err_msg=err_msg)


def make_variables(dtype):
    return [keras.Variable(v.astype(dtype), dtype=dtype) for v in INITIAL]


# ------------------------------------------------------------------ lockstep with the reference
SIGN_DECAYS = {
    "constant": (lambda: 1.0, 1.0),
    "linear": (
        lambda: LinearSignDecay(decay_steps=5),
        functools.partial(R.linear_sign_decay, decay_steps=5),
    ),
    "cosine": (
        lambda: CosineSignDecay(decay_steps=5, num_periods=0.5),
        functools.partial(R.cosine_sign_decay, decay_steps=5, num_periods=0.5),
    ),
    "restart": (
        lambda: RestartSignDecay(decay_steps=5, num_periods=2),
        functools.partial(R.restart_sign_decay, decay_steps=5, num_periods=2),
    ),
}

SLOTS = {
    "sign_averaging": ("_prev_values", "_prev_grads"),
    "power_sign": ("_m",),
    "add_sign": ("_m",),
    "ema_momentum": ("_momentums",),
}
CLASSES = {
    "sign_averaging": SignAveraging,
    "power_sign": PowerSign,
    "add_sign": AddSign,
    "ema_momentum": EMAMomentum,
}


def _lockstep_cases():
    yield pytest.param("sign_averaging", {"learning_rate": LR}, None, id="SignAveraging")
    for decay in SIGN_DECAYS:
        yield pytest.param(
            "power_sign", {"learning_rate": LR, "beta": BETA}, decay, id=f"PowerSign-{decay}"
        )
        yield pytest.param(
            "add_sign",
            {"learning_rate": LR, "alpha": ALPHA, "beta": BETA},
            decay,
            id=f"AddSign-{decay}",
        )
    for bias_correction in (False, True):
        yield pytest.param(
            "ema_momentum",
            {"learning_rate": LR, "momentum": MU, "bias_correction": bias_correction},
            None,
            id=f"EMAMomentum-bias_correction={bias_correction}",
        )


LOCKSTEP_CASES = list(_lockstep_cases())


def make_pair(rule, hyper, decay, dtype):
    """The optimizer and its NumPy reference, with the same hyperparameters."""
    optimizer_hyper, reference_hyper = dict(hyper), dict(hyper)
    if decay is not None:
        optimizer_hyper["sign_decay"] = SIGN_DECAYS[decay][0]()
        reference_hyper["sign_decay"] = SIGN_DECAYS[decay][1]
    optimizer = CLASSES[rule](**optimizer_hyper)
    return optimizer, R.ReferenceOptimizer(rule, dtype, **reference_hyper)


def check_lockstep(optimizer, reference, variables, dtype, apply=None):
    """Applies the seven gradient steps to both and compares values and slots after each."""
    apply = apply or (lambda grads: optimizer.apply(grads, variables))
    values = [v.numpy() for v in variables]
    rule = reference.rule
    for t, grads in enumerate(gradient_steps(dtype)):
        apply(grads)
        values = reference.apply(grads, values)
        assert int(optimizer.iterations) == t + 1
        for i, (variable, expected) in enumerate(zip(variables, values, strict=True)):
            assert variable.dtype == dtype
            assert_close(variable.numpy(), expected, dtype, f"{rule} step {t} variable {i}")
            for name, slot in zip(SLOTS[rule], reference.state[i], strict=True):
                actual = getattr(optimizer, name)[i]
                assert actual.dtype == dtype
                assert_close(actual.numpy(), slot, dtype, f"{rule} step {t} {name}[{i}]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rule", "hyper", "decay"), LOCKSTEP_CASES)
def test_lockstep_with_reference(rule, hyper, decay, dtype):
    optimizer, reference = make_pair(rule, hyper, decay, dtype)
    check_lockstep(optimizer, reference, make_variables(dtype), dtype)


@pytest.mark.parametrize(
    ("rule", "hyper", "decay"),
    [c for c in LOCKSTEP_CASES if c.id in ("SignAveraging", "PowerSign-linear", "AddSign-restart")]
    + [c for c in LOCKSTEP_CASES if c.id == "EMAMomentum-bias_correction=True"],
)
def test_lockstep_with_reference_in_compiled_step(rule, hyper, decay):
    """Inside one compiled step (`tf.function`, `jax.jit`) the step-dependent terms (first step,
    d(t), bias correction) must come from `iterations`, not from Python state frozen at trace
    time."""
    dtype = "float32"
    optimizer, reference = make_pair(rule, hyper, decay, dtype)
    variables = make_variables(dtype)
    optimizer.build(variables)
    apply, traces = compiled_apply(optimizer, variables)
    check_lockstep(optimizer, reference, variables, dtype, apply=apply)
    assert traces() == 1


@pytest.mark.parametrize(
    ("rule", "hyper"),
    [
        ("power_sign", {"learning_rate": LR, "base": 2.0, "beta": 0.9, "sign_decay": 0.3}),
        ("add_sign", {"learning_rate": LR, "alpha": 0.3, "beta": 0.9, "sign_decay": 0.3}),
        ("ema_momentum", {"learning_rate": LR, "momentum": 0.9, "bias_correction": True}),
    ],
    ids=["PowerSign", "AddSign", "EMAMomentum"],
)
def test_float64_keeps_float64_hyperparameters(rule, hyper):
    """With float64 variables the hyperparameters (beta, momentum, alpha, log(base), a
    constant sign decay) must take part in float64, not rounded to float32 on the way."""
    dtype = "float64"
    optimizer = CLASSES[rule](**hyper)
    reference = R.ReferenceOptimizer(rule, dtype, **hyper)
    check_lockstep(optimizer, reference, make_variables(dtype), dtype)


# ------------------------------------------------------------------ TensorFlow's fused kernels
@pytest.mark.tensorflow_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", SIGN_DECAYS)
@pytest.mark.parametrize("rule", ["power_sign", "add_sign"])
def test_matches_fused_kernel(rule, decay, dtype):
    import tensorflow as tf

    schedule = SIGN_DECAYS[decay][0]()
    if rule == "power_sign":
        optimizer = PowerSign(learning_rate=LR, beta=BETA, sign_decay=schedule)
    else:
        optimizer = AddSign(learning_rate=LR, alpha=ALPHA, beta=BETA, sign_decay=schedule)
    variables = make_variables(dtype)
    kernel_vars = [tf.Variable(v.astype(dtype)) for v in INITIAL]
    kernel_ms = [tf.Variable(np.zeros_like(v, dtype=dtype)) for v in INITIAL]

    def scalar(value):
        return tf.constant(value, dtype=dtype)

    for t, grads in enumerate(gradient_steps(dtype)):
        d = schedule(np.asarray(t, dtype)) if callable(schedule) else schedule
        for var, m, g in zip(kernel_vars, kernel_ms, grads, strict=True):
            if rule == "power_sign":
                tf.raw_ops.ResourceApplyPowerSign(
                    var=var.handle,
                    m=m.handle,
                    lr=scalar(LR),
                    logbase=scalar(math.log(math.e)),
                    sign_decay=tf.cast(d, dtype),
                    beta=scalar(BETA),
                    grad=tf.constant(g),
                )
            else:
                tf.raw_ops.ResourceApplyAddSign(
                    var=var.handle,
                    m=m.handle,
                    lr=scalar(LR),
                    alpha=scalar(ALPHA),
                    sign_decay=tf.cast(d, dtype),
                    beta=scalar(BETA),
                    grad=tf.constant(g),
                )
        optimizer.apply(grads, variables)
        for i in range(len(INITIAL)):
            message = f"{rule} {decay} step {t} variable {i}"
            assert_close(variables[i].numpy(), kernel_vars[i].numpy(), dtype, message)
            assert_close(optimizer._m[i].numpy(), kernel_ms[i].numpy(), dtype, message + " m")


@pytest.mark.tensorflow_only
@pytest.mark.parametrize(
    "make, kernels",
    [
        (lambda: PowerSign(LR), ["ResourceApplyPowerSign"]),
        (lambda: AddSign(LR), ["ResourceApplyAddSign"]),
        (
            lambda: EMAMomentum(LR, bias_correction=True),
            ["ResourceApplyPowerSign", "ResourceApplyGradientDescent"],
        ),
    ],
    ids=["PowerSign", "AddSign", "EMAMomentum"],
)
def test_compiled_step_runs_the_fused_kernels(make, kernels):
    """In a compiled step (where Keras hands TensorFlow variables to `update_step`) the rule is
    TensorFlow's in-place kernels, not the `keras.ops` path's passes over new arrays."""
    import tensorflow as tf

    optimizer = make()
    variables = make_variables("float32")
    optimizer.build(variables)
    grads = [tf.constant(g) for g in gradient_steps("float32")[0]]
    step = tf.function(lambda: optimizer.apply(grads, variables))
    ops = [node.op for node in step.get_concrete_function().graph.as_graph_def().node]
    for kernel in kernels:
        assert ops.count(kernel) == len(variables)
    assert "Sign" not in ops
    assert "AssignSubVariableOp" not in ops


@pytest.mark.tensorflow_only
def test_ema_momentum_leaves_its_update_to_xla_under_jit_compile():
    """XLA fuses the `keras.ops` path into one pass, which beats the two in-place kernels."""
    import tensorflow as tf

    optimizer = EMAMomentum(LR)
    variables = make_variables("float32")
    optimizer.build(variables)
    grads = [tf.constant(g) for g in gradient_steps("float32")[0]]
    step = tf.function(lambda: optimizer.apply(grads, variables), jit_compile=True)
    ops = [node.op for node in step.get_concrete_function().graph.as_graph_def().node]
    assert "ResourceApplyGradientDescent" not in ops
    assert ops.count("AssignSubVariableOp") == len(variables)


# ------------------------------------------------------------------ equivalences with Keras
def quadratic_gradients(values, curvatures):
    """Gradients of 0.5 * sum(c * w**2) at each optimizer's own current values."""
    return [c * v.numpy() for c, v in zip(curvatures, values, strict=True)]


CURVATURES = (np.array([0.5, 2.0, 8.0]), np.array([[0.1, 1.0], [3.0, 0.25]]))
START = (np.array([1.0, -2.0, 0.5]), np.array([[10.0, -4.0], [1.5, 30.0]]))


def run_both(first, second, dtype, steps):
    """Runs two optimizers on the same quadratic; yields both trajectories step by step."""
    a = [keras.Variable(v.astype(dtype), dtype=dtype) for v in START]
    b = [keras.Variable(v.astype(dtype), dtype=dtype) for v in START]
    curvatures = [c.astype(dtype) for c in CURVATURES]
    for t in range(steps):
        first.apply(quadratic_gradients(a, curvatures), a)
        second.apply(quadratic_gradients(b, curvatures), b)
        yield t, [v.numpy() for v in a], [v.numpy() for v in b]


@pytest.mark.parametrize(
    ("dtype", "lr", "mu", "rtol"),
    [
        # float32: the two forms round differently (SGD keeps -lr*(1-mu)*m in its slot), so
        # they agree to a few ulps per step, accumulated over 25 steps of an oscillating
        # trajectory, not bit for bit.
        ("float32", 0.2, 0.9, 2e-5),
        # float64: Keras keeps SGD's learning rate lr*(1-mu) in a float32 variable, so only
        # values that float32 represents exactly can agree to float64 precision.
        ("float64", 0.25, 0.75, 1e-12),
    ],
)
def test_ema_momentum_is_rescaled_sgd(dtype, lr, mu, rtol):
    ema = EMAMomentum(learning_rate=lr, momentum=mu, bias_correction=False)
    sgd = keras.optimizers.SGD(learning_rate=lr * (1 - mu), momentum=mu)
    moved = False
    for t, ours, theirs in run_both(ema, sgd, dtype, steps=25):
        for i, (x, y) in enumerate(zip(ours, theirs, strict=True)):
            np.testing.assert_allclose(
                x, y, rtol=rtol, atol=rtol * np.max(np.abs(y)), err_msg=f"step {t} var {i}"
            )
        moved = moved or not np.allclose(ours[0], START[0])
    assert moved


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "make",
    [
        lambda: (PowerSign(learning_rate=0.25, sign_decay=0.0), 0.25),
        lambda: (PowerSign(learning_rate=0.25, base=10.0, beta=0.5, sign_decay=0.0), 0.25),
        lambda: (AddSign(learning_rate=0.25, alpha=0.5, sign_decay=0.0), 0.125),
        lambda: (AddSign(learning_rate=0.25, alpha=2.0, beta=0.0, sign_decay=0.0), 0.5),
    ],
    ids=["PowerSign", "PowerSign-base10", "AddSign-alpha0.5", "AddSign-alpha2"],
)
def test_sign_rules_without_sign_decay_are_sgd(make, dtype):
    optimizer, sgd_lr = make()
    sgd = keras.optimizers.SGD(learning_rate=sgd_lr)
    for t, ours, theirs in run_both(optimizer, sgd, dtype, steps=20):
        for i, (x, y) in enumerate(zip(ours, theirs, strict=True)):
            assert_close(x, y, dtype, f"step {t} var {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mu", [0.5, 0.9, 0.99])
def test_bias_corrected_first_step_is_sgd(mu, dtype):
    ema = EMAMomentum(learning_rate=0.1, momentum=mu, bias_correction=True)
    sgd = keras.optimizers.SGD(learning_rate=0.1)
    # m_hat = (1 - mu) g / (1 - mu) equals g up to two roundings.
    _, ours, theirs = next(run_both(ema, sgd, dtype, steps=1))
    for x, y in zip(ours, theirs, strict=True):
        assert_close(x, y, dtype)


def test_bias_corrected_momentum_tracks_sgd_then_overshoots():
    """§1.3 / §4.4: the bias-corrected variant starts like SGD at lr, plain EMA momentum
    starts slower, and both momentum variants overshoot the minimum at 0."""
    w0 = np.array([10.0], "float32")
    lr, mu = 0.1, 0.9

    def trajectory(optimizer, steps=40):
        w = keras.Variable(w0)
        values = []
        for _ in range(steps):
            optimizer.apply([w.numpy()], [w])  # gradient of 0.5 * w**2
            values.append(float(w.numpy()[0]))
        return np.array(values)

    sgd = trajectory(keras.optimizers.SGD(learning_rate=lr))
    ema = trajectory(EMAMomentum(learning_rate=lr, momentum=mu))
    corrected = trajectory(EMAMomentum(learning_rate=lr, momentum=mu, bias_correction=True))
    assert corrected[0] == pytest.approx(sgd[0], rel=1e-6)
    assert abs(corrected[1] - sgd[1]) < 0.02 * w0[0]
    assert ema[0] > sgd[0]  # starts slower
    assert sgd.min() > 0  # plain SGD at lr 0.1 never crosses 0
    assert ema.min() < 0 and corrected.min() < 0


# ------------------------------------------------------------------ SignAveraging specifics
def test_sign_averaging_first_step_is_plain_descent():
    w = keras.Variable(np.array([1.0, -2.0, 3.0]), dtype="float64")
    optimizer = SignAveraging(learning_rate=0.5)
    optimizer.apply([np.array([-4.0, 2.0, 0.5])], [w])
    np.testing.assert_array_equal(w.numpy(), [3.0, -3.0, 2.75])
    np.testing.assert_array_equal(optimizer._prev_values[0].numpy(), [1.0, -2.0, 3.0])
    np.testing.assert_array_equal(optimizer._prev_grads[0].numpy(), [-4.0, 2.0, 0.5])


def test_sign_averaging_jumps_to_midpoint_exactly_where_the_sign_flips():
    w = keras.Variable(np.array([1.0, 1.0, 1.0, 1.0, 1.0]), dtype="float64")
    optimizer = SignAveraging(learning_rate=0.5)
    optimizer.apply([np.array([1.0, 1.0, -1.0, 0.0, 1.0])], [w])
    np.testing.assert_array_equal(w.numpy(), [0.5, 0.5, 1.5, 1.0, 0.5])
    # flip:   yes   no    yes   no (prev 0)  no (g 0)
    optimizer.apply([np.array([-2.0, 2.0, 4.0, -3.0, 0.0])], [w])
    np.testing.assert_array_equal(w.numpy(), [0.75, -0.5, 1.25, 2.5, 0.5])
    np.testing.assert_array_equal(optimizer._prev_values[0].numpy(), [0.5, 0.5, 1.5, 1.0, 0.5])
    # The previous gradient of the third step is the second step's, whatever it flipped.
    optimizer.apply([np.array([2.0, 2.0, 4.0, -3.0, -1.0])], [w])
    np.testing.assert_array_equal(w.numpy(), [0.625, -1.5, -0.75, 4.0, 1.0])


def test_sign_averaging_midpoint_does_not_overflow():
    """`w + (prev_value - w) / 2` stays finite where `(prev_value + w) / 2` would overflow."""
    big = float(np.finfo("float32").max)
    w = keras.Variable(np.array([0.75 * big], "float32"))
    optimizer = SignAveraging(learning_rate=1.0)
    optimizer.apply([np.array([0.25 * big], "float32")], [w])  # descent to 0.5 * max
    optimizer.apply([np.array([-1.0], "float32")], [w])  # flip: midpoint of 0.75 and 0.5
    assert np.isfinite(w.numpy()).all()
    np.testing.assert_allclose(w.numpy(), [0.625 * big], rtol=1e-6)


# ------------------------------------------------------------------ sign decay schedules
SCHEDULES = [
    pytest.param(LinearSignDecay, {"decay_steps": 7}, R.linear_sign_decay, id="linear"),
    pytest.param(CosineSignDecay, {"decay_steps": 7}, R.cosine_sign_decay, id="cosine-default"),
    pytest.param(
        CosineSignDecay, {"decay_steps": 12, "num_periods": 2.5}, R.cosine_sign_decay, id="cosine"
    ),
    pytest.param(RestartSignDecay, {"decay_steps": 9}, R.restart_sign_decay, id="restart-default"),
    pytest.param(
        RestartSignDecay,
        {"decay_steps": 12, "num_periods": 3},
        R.restart_sign_decay,
        id="restart",
    ),
    pytest.param(
        RestartSignDecay,
        {"decay_steps": 10, "num_periods": 4},  # period 2.5 steps
        R.restart_sign_decay,
        id="restart-fractional-period",
    ),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("cls", "kwargs", "reference"), SCHEDULES)
def test_sign_decay_matches_reference(cls, kwargs, reference, dtype):
    schedule = cls(**kwargs)
    horizon = kwargs["decay_steps"]
    for t in [*range(3 * horizon), 10 * horizon, 1000 * horizon]:
        actual = ops.convert_to_numpy(schedule(np.asarray(t, dtype)))
        expected = reference(t, **kwargs, dtype=dtype)
        assert actual.dtype == dtype
        # d(t) = 0.5 * (1 + cos(x)) loses relative precision near 0, so the absolute
        # tolerance is relative to d's range [0, 1].
        rtol = RTOL[dtype]
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol, err_msg=f"t={t}")
        assert 0.0 <= float(actual) <= 1.0
        if t >= horizon:
            assert float(actual) == 0.0, f"d({t}) must be 0 from T={horizon} on"
    assert float(schedule(0)) == 1.0


def test_sign_decay_documented_defaults_and_values():
    assert CosineSignDecay(decay_steps=10).num_periods == 0.5
    assert RestartSignDecay(decay_steps=10).num_periods == 1.0
    linear = LinearSignDecay(decay_steps=4)
    assert [float(linear(t)) for t in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    cosine = CosineSignDecay(decay_steps=100)
    assert float(cosine(50)) == pytest.approx(0.5, abs=1e-6)
    restart = RestartSignDecay(decay_steps=8, num_periods=2)
    values = [float(restart(t)) for t in range(10)]
    np.testing.assert_allclose(values[:5], [1.0, 0.8535534, 0.5, 0.1464466, 1.0], atol=1e-6)
    assert values[8:] == [0.0, 0.0]


@pytest.mark.parametrize("step_dtype", ["int32", "int64", "float32"])
def test_sign_decay_accepts_integer_steps(step_dtype):
    schedule = LinearSignDecay(decay_steps=4)
    value = schedule(ops.convert_to_tensor(1, dtype=step_dtype))
    assert float(value) == 0.75


@pytest.mark.parametrize(("cls", "kwargs", "reference"), SCHEDULES)
def test_sign_decay_serialization_round_trip(cls, kwargs, reference):
    schedule = cls(**kwargs)
    serialized = keras.saving.serialize_keras_object(schedule)
    serialized = json.loads(json.dumps(serialized))
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is cls
    assert restored.get_config() == schedule.get_config()
    assert cls.from_config(schedule.get_config()).get_config() == schedule.get_config()
    for t in range(2 * kwargs["decay_steps"]):
        assert float(restored(t)) == float(schedule(t))


# ------------------------------------------------------------------ validation
def _message(name, allowed, value):
    """The regular expression of 'Argument `name` must be in <allowed>. Received: name=<value>'
    (a number may be shown as an int or a float)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        shown = rf"{re.escape(repr(value))}(\.0)?" if value == value else "nan"
    else:
        shown = re.escape(repr(value))
    return rf"Argument `{name}` must be [^.]*{re.escape(allowed)}.*Received: {name}={shown}$"


OPTIMIZER_CLASSES = [SignAveraging, PowerSign, AddSign, EMAMomentum]


@pytest.mark.parametrize("value", [0, -1, float("nan"), "x"])
@pytest.mark.parametrize("cls", OPTIMIZER_CLASSES, ids=lambda c: c.__name__)
def test_bad_learning_rate(cls, value):
    with pytest.raises(ValueError, match=_message("learning_rate", "(0, inf)", value)):
        cls(learning_rate=value)


BAD_ARGUMENTS = [
    (PowerSign, "beta", 1.5, "[0, 1)"),
    (PowerSign, "beta", 1.0, "[0, 1)"),
    (AddSign, "beta", -0.1, "[0, 1)"),
    (AddSign, "beta", float("nan"), "[0, 1)"),
    (PowerSign, "base", 0, "(0, inf)"),
    (PowerSign, "base", -1, "(0, inf)"),
    (AddSign, "alpha", -1, "[0, inf)"),
    (EMAMomentum, "momentum", 1.0, "[0, 1)"),
    (EMAMomentum, "momentum", -0.1, "[0, 1)"),
    (PowerSign, "sign_decay", 1.5, "[0, 1]"),
    (AddSign, "sign_decay", -0.5, "[0, 1]"),
    (LinearSignDecay, "decay_steps", 0, "positive integer"),
    (CosineSignDecay, "decay_steps", 2.5, "positive integer"),
    (RestartSignDecay, "decay_steps", -3, "positive integer"),
]


@pytest.mark.parametrize(
    ("cls", "name", "value", "allowed"),
    BAD_ARGUMENTS,
    ids=[f"{c.__name__}-{n}={v}" for c, n, v, _ in BAD_ARGUMENTS],
)
def test_bad_argument_message_names_argument_range_and_value(cls, name, value, allowed):
    kwargs = {"decay_steps": 10} if issubclass(cls, SignDecay) else {}
    kwargs[name] = value
    with pytest.raises(ValueError, match=_message(name, allowed, value)):
        cls(**kwargs)


def test_exact_message_example():
    with pytest.raises(
        ValueError, match=r"^Argument `beta` must be in \[0, 1\)\. Received: beta=1\.5$"
    ):
        AddSign(beta=1.5)


@pytest.mark.parametrize("cls", [CosineSignDecay, RestartSignDecay])
@pytest.mark.parametrize("value", [0, -1])
def test_bad_num_periods(cls, value):
    with pytest.raises(ValueError, match=_message("num_periods", "(0, inf)", value)):
        cls(decay_steps=10, num_periods=value)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_bias_correction(value):
    with pytest.raises(
        ValueError,
        match=rf"Argument `bias_correction` must be True or False\. "
        rf"Received: bias_correction={re.escape(repr(value))}$",
    ):
        EMAMomentum(bias_correction=value)


@pytest.mark.parametrize("cls", [PowerSign, AddSign])
@pytest.mark.parametrize("value", ["x", None, True, lambda t: 1.0])
def test_bad_sign_decay_type(cls, value):
    with pytest.raises(
        ValueError,
        match=r"Argument `sign_decay` must be a number in \[0, 1\] or a sign decay schedule"
        rf".*Received: sign_decay={re.escape(repr(value))}$",
    ):
        cls(sign_decay=value)


@pytest.mark.parametrize("cls", OPTIMIZER_CLASSES, ids=lambda c: c.__name__)
def test_bad_instrumentation_arguments(cls):
    with pytest.raises(ValueError, match=r"Argument `statistics`.*'nope'.*statistics='nope'"):
        cls(statistics="nope")
    with pytest.raises(
        ValueError,
        match=r"Argument `aggregation` must be one of \('variable', 'layer', 'global'\)\. "
        r"Received: aggregation='bad'$",
    ):
        cls(aggregation="bad")
    for argument in ("include", "exclude"):
        with pytest.raises(ValueError, match=rf"Argument `{argument}` .*regular expression '\(\['"):
            cls(**{argument: "(["})


@pytest.mark.parametrize(
    "make",
    [
        lambda: PowerSign(beta=0.0, sign_decay=0.0, base=1.0),
        lambda: PowerSign(sign_decay=1.0, base=1e-3),
        lambda: AddSign(alpha=0.0, beta=0.0, sign_decay=1),
        lambda: EMAMomentum(momentum=0.0, bias_correction=True),
        lambda: SignAveraging(learning_rate=1e-12),
        lambda: SignAveraging(
            learning_rate=keras.optimizers.schedules.ExponentialDecay(1.0, 1, 0.5)
        ),
        lambda: CosineSignDecay(decay_steps=1, num_periods=1e-3),
        lambda: RestartSignDecay(decay_steps=np.int64(3)),
    ],
)
def test_boundary_values_are_accepted(make):
    make()


# ------------------------------------------------------------------ configuration round trips
def _config_cases():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=2, decay_rate=0.5)
    yield pytest.param(lambda: SignAveraging(learning_rate=0.03), id="SignAveraging")
    yield pytest.param(
        lambda: SignAveraging(learning_rate=schedule, statistics=["grad_norm"]),
        id="SignAveraging-lr-schedule",
    )
    yield pytest.param(
        lambda: PowerSign(learning_rate=0.02, base=2.0, beta=0.5, sign_decay=0.25),
        id="PowerSign",
    )
    yield pytest.param(
        lambda: PowerSign(learning_rate=schedule, sign_decay=LinearSignDecay(decay_steps=4)),
        id="PowerSign-schedules",
    )
    yield pytest.param(
        lambda: AddSign(
            learning_rate=0.02,
            alpha=0.5,
            sign_decay=CosineSignDecay(decay_steps=6, num_periods=1.5),
            clipnorm=1.0,
        ),
        id="AddSign-cosine",
    )
    yield pytest.param(
        lambda: AddSign(
            learning_rate=schedule,
            sign_decay=RestartSignDecay(decay_steps=6, num_periods=2),
            aggregation="layer",
            include=["variable"],
        ),
        id="AddSign-schedules",
    )
    yield pytest.param(
        lambda: EMAMomentum(learning_rate=schedule, momentum=0.5, bias_correction=True),
        id="EMAMomentum",
    )


@pytest.mark.parametrize("make", list(_config_cases()))
def test_config_round_trip_gives_same_config_and_trajectory(make):
    optimizer = make()
    config = optimizer.get_config()
    json.dumps(config)  # plain data
    clones = [
        # Keras' base `from_config` replaces a serialized learning-rate schedule in the dict
        # it is given, so it gets a copy.
        type(optimizer).from_config(copy.deepcopy(config)),
        keras.optimizers.deserialize(json.loads(json.dumps(keras.optimizers.serialize(optimizer)))),
    ]
    for clone in clones:
        assert type(clone) is type(optimizer)
        assert clone.get_config() == config

    variables = [make_variables("float32") for _ in range(1 + len(clones))]
    for grads in gradient_steps("float32"):
        for opt, vs in zip([optimizer, *clones], variables, strict=True):
            opt.apply(grads, vs)
    for vs in variables[1:]:
        for expected, actual in zip(variables[0], vs, strict=True):
            np.testing.assert_array_equal(actual.numpy(), expected.numpy())
