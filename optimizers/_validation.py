"""Argument checks shared by the optimizers: every message names the argument,
what is allowed and what was received."""

import math

from keras.optimizers.schedules import LearningRateSchedule

from optiscope.tracking._checks import check_in_range, check_positive_int, is_number

__all__ = ["check_hyperparameters", "check_in_range", "check_learning_rate", "check_positive_int"]


def check_learning_rate(value):
    """Accepts a positive float, a `LearningRateSchedule` or a callable."""
    if isinstance(value, LearningRateSchedule) or callable(value):
        return value
    return check_in_range("learning_rate", value, 0, math.inf, low_closed=False)


# The hyperparameters of Keras' built-in optimizers that Keras accepts unchecked (or checks with
# a misleading message): name -> (low, high, low_closed, high_closed).
HYPERPARAMETER_RANGES = {
    "beta_1": (0, 1, True, False),
    "beta_2": (0, 1, True, False),
    "epsilon": (0, math.inf, False, False),
    "momentum": (0, 1, True, False),
    "rho": (0, 1, True, False),
    "weight_decay": (0, math.inf, True, False),
    "initial_accumulator_value": (0, math.inf, True, False),
    "clipnorm": (0, math.inf, False, False),
    "clipvalue": (0, math.inf, False, False),
    "global_clipnorm": (0, math.inf, False, False),
    "ema_momentum": (0, 1, True, True),
}


def check_hyperparameters(arguments):
    """Checks the numeric hyperparameters in `arguments` (name -> value) that Keras' built-in
    optimizers take; values that are not plain numbers (tensors, variables, None) are left to
    Keras."""
    if "learning_rate" in arguments and is_number(arguments["learning_rate"]):
        check_learning_rate(arguments["learning_rate"])
    for name, (low, high, low_closed, high_closed) in HYPERPARAMETER_RANGES.items():
        value = arguments.get(name)
        if value is not None and (is_number(value) or isinstance(value, str)):
            check_in_range(name, value, low, high, low_closed=low_closed, high_closed=high_closed)
