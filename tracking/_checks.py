"""Argument checks: every message names the argument, what is allowed and what was received."""

import math
import numbers
import os


def _interval(low, high, low_closed, high_closed):
    return f"{'[' if low_closed else '('}{low}, {high}{']' if high_closed else ')'}"


def is_number(value):
    """True for a real number (Python or NumPy), False for a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_in_range(name, value, low, high, *, low_closed=True, high_closed=False):
    """Returns `value` as a float, or raises `ValueError` when it is outside the interval
    (NaN and, unless the interval is closed there, infinities are outside)."""
    allowed = _interval(low, high, low_closed, high_closed)
    if not is_number(value):
        raise ValueError(
            f"Argument `{name}` must be a number in {allowed}. Received: {name}={value!r}"
        )
    value = float(value)
    above = value >= low if low_closed else value > low
    below = value <= high if high_closed else value < high
    if math.isnan(value) or not (above and below):
        raise ValueError(f"Argument `{name}` must be in {allowed}. Received: {name}={value!r}")
    return value


def check_positive(name, value):
    """A finite number > 0."""
    return check_in_range(name, value, 0, math.inf, low_closed=False)


def check_non_negative(name, value):
    """A finite number >= 0."""
    return check_in_range(name, value, 0, math.inf)


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(
            f"Argument `{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return int(value)


def check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"Argument `{name}` must be one of {tuple(choices)}. Received: {name}={value!r}"
        )
    return value


def check_name(name, value, optional=True):
    """A non-empty string (or None where `optional`)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        allowed = "a non-empty string" + (" or None" if optional else "")
        raise ValueError(f"Argument `{name}` must be {allowed}. Received: {name}={value!r}")
    return value


def check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"Argument `{name}` must be True or False. Received: {name}={value!r}")
    return value


def check_mapping(name, value):
    """A dict (None counts as empty); returned as a new dict."""
    if value is None:
        return {}
    if not hasattr(value, "items"):
        raise ValueError(f"Argument `{name}` must be a dict or None. Received: {name}={value!r}")
    return dict(value)


def check_path(name, value):
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"Argument `{name}` must be a non-empty path. Received: {name}={value!r}")
    return os.fspath(value)


def writable_directory(name, path):
    """Creates `path` if needed; raises `ValueError` naming the argument if it is not writable."""
    path = check_path(name, path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"Argument `{name}` is not a writable directory: {path!r} ({err})"
        ) from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"Argument `{name}` is not a writable directory: {path!r}")
    return path
