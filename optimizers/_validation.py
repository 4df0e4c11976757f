"""Argument checks shared by the optimizers: every message names the argument,
what is allowed and what was received."""

import math
import numbers

from keras.optimizers.schedules import LearningRateSchedule


def _interval(low, high, low_closed, high_closed):
    return f"{'[' if low_closed else '('}{low}, {high}{']' if high_closed else ')'}"


def check_in_range(name, value, low, high, *, low_closed=True, high_closed=False):
    """Returns `value` as a float, or raises `ValueError` when it is outside the interval."""
    allowed = _interval(low, high, low_closed, high_closed)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"Argument `{name}` must be a number in {allowed}. Received: {name}={value!r}"
        )
    value = float(value)
    above = value >= low if low_closed else value > low
    below = value <= high if high_closed else value < high
    if math.isnan(value) or not (above and below):
        raise ValueError(f"Argument `{name}` must be in {allowed}. Received: {name}={value!r}")
    return value


def check_learning_rate(value):
    """Accepts a positive float, a `LearningRateSchedule` or a callable."""
    if isinstance(value, LearningRateSchedule) or callable(value):
        return value
    return check_in_range("learning_rate", value, 0, math.inf, low_closed=False)


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(
            f"Argument `{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return int(value)
