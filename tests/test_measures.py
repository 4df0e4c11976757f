"""New statistics plug in through the measures registry, without touching the mixin."""

import numpy as np
import pytest
from keras import ops

from optiscope.optimizers import (
    InstrumentedSGD,
    Statistic,
    measures,
    register_quantity,
    register_statistic,
)


@pytest.fixture
def grad_l1():
    register_quantity("grad_abs", lambda s: ops.sum(ops.abs(ops.cast(s.gradient, "float64"))))
    register_statistic(Statistic("grad_l1_norm", ("grad_abs",), lambda total: total))
    yield "grad_l1_norm"
    measures.STATISTICS.pop("grad_l1_norm")
    measures.QUANTITIES.pop("grad_abs")


def test_registered_statistic_is_computed_per_variable_and_per_layer(grad_l1):
    import keras

    a = keras.Variable(np.array([1.0, -2.0, 3.0], "float32"), name="a")
    b = keras.Variable(np.array([[0.5, -0.5]], "float32"), name="b")
    by_variable = InstrumentedSGD(0.1, statistics=[grad_l1, "grad_norm"])
    by_layer = InstrumentedSGD(0.1, statistics=[grad_l1], aggregation="global")
    grads = [np.array([0.1, -0.2, 0.3], "float32"), np.array([[-4.0, 2.0]], "float32")]
    for optimizer in (by_variable, by_layer):
        optimizer.apply(grads, [a, b])
    stats = by_variable.statistics()
    assert stats[grad_l1, "a"].last == pytest.approx(0.6, rel=1e-6)
    assert stats[grad_l1, "b"].last == pytest.approx(6.0, rel=1e-6)
    assert stats["grad_norm", "b"].last == pytest.approx(np.hypot(4.0, 2.0), rel=1e-6)
    assert by_layer.statistics()[grad_l1, "global"].last == pytest.approx(6.6, rel=1e-6)


def test_statistic_with_unknown_quantity_is_refused():
    with pytest.raises(ValueError, match="unknown quantities"):
        register_statistic(Statistic("nope", ("no_such_quantity",), lambda x: x))
