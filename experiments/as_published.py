"""Emulations of what the source articles' own code computed, labelled "as published".

These are not the library's optimizers (see `optiscope.optimizers` for the rules as their
authors describe them). They reproduce two articles' published numbers so the experiments can
show where those numbers come from:

* `SignAveragingAsPublished` (the housing blog): the blog's optimizer tests a Python attribute
  `_is_first` inside the per-variable update, which `tf.function` runs once per variable while
  tracing. The first variable traced (the kernel) gets a graph of plain gradient descent and keeps
  it for the whole training; the flag is then False, so the next one (the bias) gets the averaging
  rule, `w <- where(g * prev_grad >= 0, w - lr * g, (prev_value + w) / 2)`. Both slots are updated
  for both variables.
* `PowerSignAsPublished`, `AddSignAsPublished` (the Rosenbrock post): `alpha` is built from
  `beta` (so alpha = beta = 0.5) and `m <- max(beta * m + 1e-7, |g|)`, so sign(m) is always +1:
  PowerSign `w <- w - lr * g * exp(log(alpha) * sign(g) * sign(m))`,
  AddSign `w <- w - lr * g * (1 + alpha * sign(g) * sign(m))`.
* `RMSpropAsPublished` (the post's RMSprop, TensorFlow 1's `RMSPropOptimizer`): decay 0.9,
  `ms` initialised to ones, `ms <- ms + (g^2 - ms) * (1 - decay)` (as TensorFlow's kernel
  writes it), `w <- w - lr * g / sqrt(ms + 1e-10)`.

The Rosenbrock rules are functions of `(w, g, slot, lr)` shared by the optimizer classes and by
`scan`, which runs many learning rates at once.
"""

import keras
from keras import ops

from optiscope.optimizers import SignAveraging
from optiscope.optimizers.instrumentation import Instrumented

# ------------------------------------------------------------------------- housing


class SignAveragingAsPublished(SignAveraging):
    """The housing blog's SignAveraging as its trace-time flag made it run: the first model
    variable (the kernel of a `Dense` layer) by plain gradient descent, the others by the
    averaging rule with `g * prev_grad >= 0` for the descent branch."""

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        index = self._get_variable_index(variable)
        prev_value, prev_grad = self._prev_values[index], self._prev_grads[index]
        w = ops.convert_to_tensor(variable)
        w_descent = ops.subtract(w, ops.multiply(gradient, lr))
        if index == 0:  # traced while `_is_first` was still True
            w_new = w_descent
        else:
            keep = ops.greater_equal(ops.multiply(gradient, prev_grad), 0)
            w_new = ops.where(keep, w_descent, ops.divide(ops.add(prev_value, w), 2))
        self.assign(prev_value, w)
        self.assign(prev_grad, gradient)
        self.assign(variable, w_new)


# ------------------------------------------------------------------------- Rosenbrock

BETA = 0.5  # the post's default beta, also used as its alpha
EPSILON = 1e-7  # the post's floor on m
RMS_DECAY, RMS_EPSILON = 0.9, 1e-10  # TensorFlow 1's RMSPropOptimizer defaults


def _sign_moment(g, m):
    return ops.maximum(ops.add(ops.multiply(m, BETA), EPSILON), ops.abs(g))


def power_sign(w, g, m, lr):
    """The post's PowerSign step: returns (new w, new m)."""
    m = _sign_moment(g, m)
    log_alpha = ops.log(ops.convert_to_tensor(BETA, w.dtype))
    scale = ops.exp(ops.multiply(log_alpha, ops.multiply(ops.sign(g), ops.sign(m))))
    return ops.subtract(w, ops.multiply(ops.multiply(lr, g), scale)), m


def add_sign(w, g, m, lr):
    """The post's AddSign step: returns (new w, new m)."""
    m = _sign_moment(g, m)
    scale = ops.add(1.0, ops.multiply(BETA, ops.multiply(ops.sign(g), ops.sign(m))))
    return ops.subtract(w, ops.multiply(ops.multiply(lr, g), scale)), m


def rmsprop(w, g, ms, lr):
    """TensorFlow 1's RMSProp step (no momentum): returns (new w, new ms)."""
    ms = ops.add(ms, ops.multiply(ops.subtract(ops.square(g), ms), 1 - RMS_DECAY))
    return ops.subtract(w, ops.divide(ops.multiply(lr, g), ops.sqrt(ops.add(ms, RMS_EPSILON)))), ms


class _AsPublished(Instrumented, keras.optimizers.Optimizer):
    """One slot per variable, updated with `w` by `rule(w, g, slot, lr)`."""

    rule = None
    slot = "m"
    slot_initializer = "zeros"
    _sign_reference_slot = None

    def __init__(self, learning_rate=0.001, name=None, **kwargs):
        super().__init__(learning_rate=learning_rate, name=name or type(self).__name__, **kwargs)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._rule_slots = [
            self.add_variable_from_reference(v, self.slot, initializer=self.slot_initializer)
            for v in var_list
        ]

    def update_step(self, gradient, variable, learning_rate):
        slot = self._rule_slots[self._get_variable_index(variable)]
        lr = ops.cast(learning_rate, variable.dtype)
        w, value = type(self).rule(ops.convert_to_tensor(variable), gradient, slot, lr)
        self.assign(slot, value)
        self.assign(variable, w)


class PowerSignAsPublished(_AsPublished):
    """The Rosenbrock post's PowerSign (alpha = beta = 0.5, sign(m) always +1)."""

    rule = staticmethod(power_sign)
    _sign_reference_slot = "m"


class AddSignAsPublished(_AsPublished):
    """The Rosenbrock post's AddSign (alpha = beta = 0.5, sign(m) always +1)."""

    rule = staticmethod(add_sign)
    _sign_reference_slot = "m"


class RMSpropAsPublished(_AsPublished):
    """TensorFlow 1's `RMSPropOptimizer` (decay 0.9, epsilon 1e-10 inside the square root,
    mean square initialised to ones)."""

    rule = staticmethod(rmsprop)
    slot = "ms"
    slot_initializer = "ones"


ROSENBROCK = {"RMSprop": RMSpropAsPublished, "AddSign": AddSignAsPublished,
              "PowerSign": PowerSignAsPublished}  # fmt: skip
"""The post's three optimizers, by the names its table uses."""


def scan(optimizer, learning_rates, start, steps, objective):
    """Runs `optimizer` (a class of `ROSENBROCK`) from `start` at every rate of
    `learning_rates` at once, in float32, for `steps` steps; returns the path, an array
    (steps + 1, rates, 2) whose row s is the point after s steps. `objective(x, y)` is summed
    over the rates, which do not interact: every rule is element-wise."""
    import numpy as np
    import tensorflow as tf

    rates = np.asarray(learning_rates, "float32")[:, None]
    points = np.tile(np.asarray(start, "float32"), (len(rates), 1))
    initial = 1.0 if optimizer.slot_initializer == "ones" else 0.0

    @tf.function(jit_compile=True)
    def loop():
        w, slot = tf.constant(points), tf.fill(points.shape, initial)
        path = tf.TensorArray(tf.float32, size=steps)
        for step in tf.range(steps):
            with tf.GradientTape() as tape:
                tape.watch(w)
                value = tf.reduce_sum(objective(w[:, 0], w[:, 1]))
            w, slot = optimizer.rule(w, tape.gradient(value, w), slot, rates)
            path = path.write(step, w)
        return path.stack()

    return np.concatenate([points[None], loop().numpy()]).astype("float64")
