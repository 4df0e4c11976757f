"""Sign decays of Bello et al. (2017): schedules d(t) for PowerSign and AddSign.

Each is a serialisable `LearningRateSchedule` of the 0-based step `t`, equal to 0 for `t >= T`.
"""

import math

import keras
from keras import ops

from optiscope.optimizers._validation import check_in_range, check_positive_int


def _as_float(step):
    step = ops.convert_to_tensor(step)
    if "float" not in str(step.dtype):
        step = ops.cast(step, "float32")
    return step


def _cos(x):
    """`cos` in the precision of `x`: on JAX, Keras' `ops.cos` computes float64 in float32."""
    if keras.backend.backend() == "jax" and str(x.dtype) == "float64":
        import jax.numpy as jnp

        return jnp.cos(x)
    return ops.cos(x)


class SignDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Base class: a decay over `decay_steps` steps, zero from `decay_steps` on."""

    def __init__(self, decay_steps):
        self.decay_steps = check_positive_int("decay_steps", decay_steps)

    def __call__(self, step):
        t = _as_float(step)
        horizon = ops.cast(self.decay_steps, t.dtype)
        return ops.where(t >= horizon, ops.zeros_like(t), self._decay(t, horizon))

    def _decay(self, t, horizon):
        raise NotImplementedError

    def get_config(self):
        return {"decay_steps": self.decay_steps}


@keras.saving.register_keras_serializable(package="optiscope")
class LinearSignDecay(SignDecay):
    """Linear sign decay: `d(t) = max(0, 1 - t / T)`.

    Args:
        decay_steps: the horizon `T`, a positive integer.

    Example:
    >>> float(LinearSignDecay(decay_steps=4)(1))
    0.75
    """

    def _decay(self, t, horizon):
        return ops.maximum(ops.zeros_like(t), 1.0 - t / horizon)


class _PeriodicSignDecay(SignDecay):
    default_periods = 1.0

    def __init__(self, decay_steps, num_periods=None):
        super().__init__(decay_steps)
        if num_periods is None:
            num_periods = self.default_periods
        self.num_periods = check_in_range("num_periods", num_periods, 0, math.inf, low_closed=False)

    def get_config(self):
        return {"decay_steps": self.decay_steps, "num_periods": self.num_periods}


@keras.saving.register_keras_serializable(package="optiscope")
class CosineSignDecay(_PeriodicSignDecay):
    """Cyclical (cosine) sign decay: `d(t) = 0.5 * (1 + cos(2 * pi * n * t / T))`.

    Args:
        decay_steps: the horizon `T`, a positive integer.
        num_periods: `n`, the number of cosine periods over `T`. Defaults to 0.5
            (one half period: a smooth decay from 1 to 0).

    Example:
    >>> round(float(CosineSignDecay(decay_steps=100)(50)), 6)
    0.5
    """

    default_periods = 0.5

    def _decay(self, t, horizon):
        return 0.5 * (1.0 + _cos(2.0 * math.pi * self.num_periods * t / horizon))


@keras.saving.register_keras_serializable(package="optiscope")
class RestartSignDecay(_PeriodicSignDecay):
    """Restart sign decay: `d(t) = 0.5 * (1 + cos(pi * (t mod (T/n)) / (T/n)))`.

    Args:
        decay_steps: the horizon `T`, a positive integer.
        num_periods: `n`, the number of restarts over `T`. Defaults to 1.

    Example:
    >>> [round(float(RestartSignDecay(decay_steps=8, num_periods=2)(t)), 6) for t in (0, 2, 4)]
    [1.0, 0.5, 1.0]
    """

    def _decay(self, t, horizon):
        fraction = ops.mod(self.num_periods * t, horizon) / horizon
        return 0.5 * (1.0 + _cos(math.pi * fraction))
