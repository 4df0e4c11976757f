"""SignAveraging: gradient descent that averages an element when its slope changes sign."""

import keras
from keras import ops

from optiscope.optimizers._common import dense_gradient
from optiscope.optimizers._validation import check_learning_rate
from optiscope.optimizers.instrumentation import Instrumented


@keras.saving.register_keras_serializable(package="optiscope")
class SignAveraging(Instrumented, keras.optimizers.Optimizer):
    """Gradient descent that jumps to the midpoint wherever the gradient changed sign.

    A sign change of an element's gradient since the previous step means the minimum along
    that element was overshot, so the element moves to the midpoint of its previous and
    current value instead of taking a gradient step:

    ```
    flip      = g * prev_grad < 0                       (element-wise)
    w_descent = w - lr * g
    w_mid     = w + (prev_value - w) / 2
    w_new     = where(flip, w_mid, w_descent)
    prev_value <- w ;  prev_grad <- g ;  w <- w_new
    ```
    Both slots start at zero, so nothing flips on the first step. Sparse gradients are
    densified. Natural statistics: `sign_flip_fraction`, `sign_flip_count` (its total is the
    cumulative number of flips).

    Args:
        learning_rate: a positive float, a `LearningRateSchedule` or a callable.
            Defaults to 0.001.
        name: the optimizer's name. Defaults to "sign_averaging".
        **kwargs: the base optimizer's arguments (`clipnorm`, `use_ema`, ...) and the
            instrumentation's (`statistics`, `include`, `exclude`, `aggregation`).

    Example:
    >>> import numpy as np
    >>> optimizer = SignAveraging(learning_rate=0.1)
    >>> w = keras.Variable(np.array([1.0, 1.0], "float32"))
    >>> optimizer.apply([np.array([1.0, 1.0], "float32")], [w])
    >>> optimizer.apply([np.array([-1.0, 1.0], "float32")], [w])
    >>> [round(float(x), 4) for x in w.numpy()]
    [0.95, 0.8]
    """

    _previous_gradient_slot = "prev_grad"
    _natural_statistics = ("sign_flip_fraction", "sign_flip_count")

    def __init__(self, learning_rate=0.001, name="sign_averaging", **kwargs):
        super().__init__(learning_rate=check_learning_rate(learning_rate), name=name, **kwargs)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._prev_values, self._prev_grads = self.add_optimizer_variables(
            var_list, ["prev_value", "prev_grad"]
        )

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = dense_gradient(gradient, variable.dtype)
        index = self._get_variable_index(variable)
        prev_value = self._prev_values[index]
        prev_grad = self._prev_grads[index]

        w = ops.convert_to_tensor(variable)
        flip = ops.less(ops.multiply(g, prev_grad), 0)
        w_descent = ops.subtract(w, ops.multiply(lr, g))
        w_mid = ops.add(w, ops.divide(ops.subtract(prev_value, w), 2))
        self.assign(prev_value, w)
        self.assign(prev_grad, g)
        self.assign(variable, ops.where(flip, w_mid, w_descent))
