"""Keras 3 optimizers from the optimizer literature, and statistics for any optimizer."""

import keras

from optiscope.optimizers.add_sign import AddSign
from optiscope.optimizers.ema_momentum import EMAMomentum
from optiscope.optimizers.instrumentation import (
    Instrumented,
    Statistics,
    Summary,
    instrument,
    unwrap,
    variable_keys,
)
from optiscope.optimizers.measures import (
    DEFAULT_STATISTICS,
    STATISTICS,
    Statistic,
    VariableStep,
    register_quantity,
    register_statistic,
)
from optiscope.optimizers.power_sign import PowerSign
from optiscope.optimizers.sign_averaging import SignAveraging
from optiscope.optimizers.sign_decay import CosineSignDecay, LinearSignDecay, RestartSignDecay

InstrumentedSGD = instrument(keras.optimizers.SGD)
InstrumentedAdam = instrument(keras.optimizers.Adam, sign_reference_slot="momentum")
InstrumentedAdamW = instrument(keras.optimizers.AdamW, sign_reference_slot="momentum")
InstrumentedRMSprop = instrument(keras.optimizers.RMSprop)
InstrumentedAdagrad = instrument(keras.optimizers.Adagrad)
InstrumentedLion = instrument(keras.optimizers.Lion, sign_reference_slot="momentum")

__all__ = [
    "AddSign",
    "CosineSignDecay",
    "DEFAULT_STATISTICS",
    "EMAMomentum",
    "Instrumented",
    "InstrumentedAdagrad",
    "InstrumentedAdam",
    "InstrumentedAdamW",
    "InstrumentedLion",
    "InstrumentedRMSprop",
    "InstrumentedSGD",
    "LinearSignDecay",
    "PowerSign",
    "RestartSignDecay",
    "STATISTICS",
    "SignAveraging",
    "Statistic",
    "Statistics",
    "Summary",
    "VariableStep",
    "instrument",
    "register_quantity",
    "register_statistic",
    "unwrap",
    "variable_keys",
]
