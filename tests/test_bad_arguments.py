"""Every bad argument is refused before training, with a message naming the argument, what is
allowed and the value received."""

import math
import warnings

import keras
import numpy as np
import pytest

from optiscope.callbacks import DivergenceGuard, OptimizerStatsLogger
from optiscope.optimizers import (
    InstrumentedAdagrad,
    InstrumentedAdam,
    InstrumentedAdamW,
    InstrumentedLion,
    InstrumentedRMSprop,
    InstrumentedSGD,
)
from optiscope.tracking import MlflowSink, NullSink, TensorBoardSink

NAN, INF = math.nan, math.inf


def mlflow_sink(tmp_path, **kwargs):
    kwargs.setdefault("tracking_uri", f"sqlite:///{tmp_path}/m.db")
    return MlflowSink(spool_dir=tmp_path, **kwargs)


def tensorboard_sink(tmp_path, **kwargs):
    return TensorBoardSink(logdir=tmp_path, run_name="r", **kwargs)


def logger(tmp_path, **kwargs):
    return OptimizerStatsLogger(sinks=[NullSink()], **kwargs)


def schedule(tmp_path, **kwargs):
    return InstrumentedSGD(0.1).schedule_reads("a reader", **kwargs)


# (what is built, keyword arguments, the message it must give)
BAD = [
    # Keras built-ins, instrumented: what Keras leaves unchecked (or words misleadingly)
    (InstrumentedAdam, {"learning_rate": NAN}, r"`learning_rate` must be in \(0, inf\)\. .*=nan"),
    (InstrumentedAdam, {"learning_rate": INF}, r"`learning_rate` must be in \(0, inf\)\. .*=inf"),
    (InstrumentedAdam, {"learning_rate": -1}, r"`learning_rate` must be in \(0, inf\)\. .*=-1"),
    (InstrumentedAdam, {"learning_rate": 0.0}, r"`learning_rate` must be in \(0, inf\)\. .*=0"),
    (InstrumentedAdam, {"beta_1": 1.0}, r"`beta_1` must be in \[0, 1\)\. .*=1\.0"),
    (InstrumentedAdam, {"beta_1": -0.1}, r"`beta_1` must be in \[0, 1\)\. .*=-0\.1"),
    (InstrumentedAdam, {"beta_1": NAN}, r"`beta_1` must be in \[0, 1\)\. .*=nan"),
    (InstrumentedAdam, {"beta_2": NAN}, r"`beta_2` must be in \[0, 1\)\. .*=nan"),
    (InstrumentedAdam, {"beta_2": 1.5}, r"`beta_2` must be in \[0, 1\)\. .*=1\.5"),
    (InstrumentedAdam, {"epsilon": -1}, r"`epsilon` must be in \(0, inf\)\. .*=-1"),
    (InstrumentedAdam, {"epsilon": 0}, r"`epsilon` must be in \(0, inf\)\. .*=0"),
    (InstrumentedAdam, {"epsilon": INF}, r"`epsilon` must be in \(0, inf\)\. .*=inf"),
    (InstrumentedAdam, {"clipnorm": -1.0}, r"`clipnorm` must be in \(0, inf\)\. .*=-1"),
    (InstrumentedAdam, {"ema_momentum": 1.5}, r"`ema_momentum` must be in \[0, 1\]\. .*=1\.5"),
    (InstrumentedAdamW, {"weight_decay": -0.1}, r"`weight_decay` must be in \[0, inf\)\. .*"),
    (InstrumentedAdamW, {"weight_decay": NAN}, r"`weight_decay` must be in \[0, inf\)\. .*=nan"),
    (InstrumentedAdamW, {"beta_1": 1.0}, r"`beta_1` must be in \[0, 1\)\. .*=1\.0"),
    (InstrumentedSGD, {"learning_rate": NAN}, r"`learning_rate` must be in \(0, inf\)\. .*=nan"),
    (InstrumentedSGD, {"momentum": 1.0}, r"`momentum` must be in \[0, 1\)\. .*=1\.0"),
    (InstrumentedSGD, {"momentum": NAN}, r"`momentum` must be in \[0, 1\)\. .*=nan"),
    (schedule, {"every": 0}, r"`every` must be a positive integer or None.*=0"),
    (schedule, {"epoch_steps": 2.5}, r"`epoch_steps` must be a positive integer or None.*=2\.5"),
    (InstrumentedRMSprop, {"rho": 1.0}, r"`rho` must be in \[0, 1\)\. .*=1\.0"),
    (InstrumentedRMSprop, {"rho": -0.5}, r"`rho` must be in \[0, 1\)\. .*=-0\.5"),
    (InstrumentedRMSprop, {"momentum": 2.0}, r"`momentum` must be in \[0, 1\)\. .*=2\.0"),
    (InstrumentedRMSprop, {"epsilon": NAN}, r"`epsilon` must be in \(0, inf\)\. .*=nan"),
    (InstrumentedAdagrad, {"initial_accumulator_value": -1.0}, r"`initial_accumulator_value`"),
    (InstrumentedAdagrad, {"epsilon": -1e-7}, r"`epsilon` must be in \(0, inf\)\. .*"),
    (InstrumentedLion, {"learning_rate": INF}, r"`learning_rate` must be in \(0, inf\)\. .*"),
    (InstrumentedLion, {"beta_2": 1.0}, r"`beta_2` must be in \[0, 1\)\. .*=1\.0"),
    # MlflowSink
    (mlflow_sink, {"retry_interval": NAN}, r"`retry_interval` must be in \(0, inf\)\. .*=nan"),
    (mlflow_sink, {"retry_interval": 0}, r"`retry_interval` must be in \(0, inf\)\. .*=0"),
    (mlflow_sink, {"retry_interval": -0.5}, r"`retry_interval` must be in \(0, inf\)"),
    (mlflow_sink, {"retry_interval": "1"}, r"`retry_interval` must be a number in .*='1'"),
    (mlflow_sink, {"flush_interval": INF}, r"`flush_interval` must be in \(0, inf\)\. .*=inf"),
    (mlflow_sink, {"flush_interval": 0}, r"`flush_interval` must be in \(0, inf\)\. .*=0"),
    (mlflow_sink, {"close_timeout": -1}, r"`close_timeout` must be in \[0, inf\)\. .*=-1"),
    (mlflow_sink, {"close_timeout": NAN}, r"`close_timeout` must be in \[0, inf\)\. .*=nan"),
    (mlflow_sink, {"close_timeout": "10"}, r"`close_timeout` must be a number in .*='10'"),
    (mlflow_sink, {"experiment_name": ""}, r"`experiment_name` must be a non-empty string"),
    (mlflow_sink, {"experiment_name": 3}, r"`experiment_name` must be a non-empty string.*=3"),
    (mlflow_sink, {"run_name": "  "}, r"`run_name` must be a non-empty string"),
    (mlflow_sink, {"run_id": 12}, r"`run_id` must be a non-empty string or None.*=12"),
    (mlflow_sink, {"parent": 5}, r"`parent` must be a non-empty string or None.*=5"),
    (mlflow_sink, {"tags": ["a"]}, r"`tags` must be a dict or None.*\['a'\]"),
    (mlflow_sink, {"asynchronous": "yes"}, r"`asynchronous` must be True or False.*='yes'"),
    (mlflow_sink, {"tracking_uri": "ftp://x"}, r"`tracking_uri` has an unsupported scheme"),
    (mlflow_sink, {"tracking_uri": ""}, r"`tracking_uri` must be a non-empty string"),
    # TensorBoardSink
    (tensorboard_sink, {"flush_secs": -1}, r"`flush_secs` must be in \(0, inf\)\. .*=-1"),
    (tensorboard_sink, {"flush_secs": NAN}, r"`flush_secs` must be in \(0, inf\)\. .*=nan"),
    (tensorboard_sink, {"flush_secs": 0}, r"`flush_secs` must be in \(0, inf\)\. .*=0"),
    (tensorboard_sink, {"subdir": ""}, r"`subdir` must be a non-empty string.*=''"),
    (tensorboard_sink, {"purge_step": 0}, r"`purge_step` must be a positive integer.*=0"),
    (tensorboard_sink, {"purge_step": 2.5}, r"`purge_step` must be a positive integer.*=2\.5"),
    # OptimizerStatsLogger
    (logger, {"interval": 0}, r"`interval` must be a positive integer.*=0"),
    (logger, {"interval": NAN}, r"`interval` must be a positive integer.*=nan"),
    (logger, {"interval": "5"}, r"`interval` must be a positive integer.*='5'"),
    (logger, {"fields": ["median"]}, r"`fields` must be a non-empty list of .*'median'"),
    (logger, {"fields": []}, r"`fields` must be a non-empty list of"),
    (logger, {"every_step": 1}, r"`every_step` must be True or False.*=1"),
    (logger, {"histograms": "yes"}, r"`histograms` must be True or False.*='yes'"),
    (logger, {"run_name": ""}, r"`run_name` must be a non-empty string"),
    (logger, {"experiment_name": 1.5}, r"`experiment_name` must be a non-empty string.*=1\.5"),
    (logger, {"run_id": ""}, r"`run_id` must be a non-empty string or None"),
    (logger, {"params": "data"}, r"`params` must be a dict or None.*='data'"),
    # DivergenceGuard
    (DivergenceGuard, {"action": "halt"}, r"`action` must be one of \('stop', 'warn'\).*'halt'"),
    (DivergenceGuard, {"action": None}, r"`action` must be one of .*=None"),
    (DivergenceGuard, {"trigger": "inf"}, r"`trigger` must be one of .*'inf'"),
    (DivergenceGuard, {"monitor": ""}, r"`monitor` must be a non-empty string.*=''"),
    (DivergenceGuard, {"monitor": None}, r"`monitor` must be a non-empty string.*=None"),
    (DivergenceGuard, {"check_every": 0}, r"`check_every` must be a positive integer.*=0"),
    (DivergenceGuard, {"check_every": 1.5}, r"`check_every` must be a positive integer"),
]


def _id(case):
    build, kwargs, _ = case
    name = getattr(build, "__name__", "?")
    return f"{name}-" + "-".join(f"{k}={v!r}" for k, v in kwargs.items())


@pytest.mark.parametrize(("build", "kwargs", "message"), BAD, ids=[_id(c) for c in BAD])
def test_bad_argument_is_refused(build, kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        if build in (mlflow_sink, tensorboard_sink, logger, schedule):
            build(tmp_path, **kwargs)
        else:
            build(**kwargs)


def test_the_table_is_large():
    assert len(BAD) >= 50, len(BAD)


def test_guard_warns_about_a_monitor_key_missing_from_the_logs():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=InstrumentedSGD(learning_rate=0.01), loss="mse")
    x = np.zeros((8, 2), "float32")
    guard = DivergenceGuard(monitor="val_los")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        model.fit(x, x[:, :1], epochs=2, verbose=0, callbacks=[guard])
    found = [str(w.message) for w in records if "monitor" in str(w.message)]
    assert len(found) == 1 and "'val_los'" in found[0] and "'loss'" in found[0], found
