"""Exponential-moving-average momentum, with or without bias correction."""

import keras
from keras import ops

from optiscope.optimizers._common import (
    dense_gradient,
    has_fused_kernels,
    in_xla,
    resource_handle,
)
from optiscope.optimizers._validation import check_in_range, check_learning_rate
from optiscope.optimizers.instrumentation import Instrumented


@keras.saving.register_keras_serializable(package="optiscope")
class EMAMomentum(Instrumented, keras.optimizers.Optimizer):
    """Momentum as an exponential moving average of the gradient.

    ```
    m <- mu * m + (1 - mu) * g
    w <- w - lr * m_hat,   m_hat = m                       (bias_correction=False)
                           m_hat = m / (1 - mu^(t+1))      (bias_correction=True)
    ```
    `t` is the 0-based step. Without bias correction this is `SGD(lr * (1 - mu), momentum=mu)`;
    with it, the first steps track plain SGD at `lr`. On the TensorFlow backend, dense float32
    and float64 updates outside XLA run in place on TensorFlow's kernels. Sparse gradients are
    densified.

    Args:
        learning_rate: a positive float, a `LearningRateSchedule` or a callable.
            Defaults to 0.01.
        momentum: `mu`, in [0, 1). Defaults to 0.9.
        bias_correction: divide `m` by `1 - mu^(t+1)`. Defaults to False.
        name: the optimizer's name. Defaults to "ema_momentum".
        **kwargs: base optimizer and instrumentation arguments.

    Example:
    >>> import numpy as np
    >>> optimizer = EMAMomentum(learning_rate=0.1, momentum=0.5, bias_correction=True)
    >>> w = keras.Variable(np.array([1.0], "float32"))
    >>> optimizer.apply([np.array([1.0], "float32")], [w])
    >>> round(float(w.numpy()[0]), 4)
    0.9
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.9,
        bias_correction=False,
        name="ema_momentum",
        **kwargs,
    ):
        super().__init__(learning_rate=check_learning_rate(learning_rate), name=name, **kwargs)
        self.momentum = check_in_range("momentum", momentum, 0, 1)
        if not isinstance(bias_correction, bool):
            raise ValueError(
                "Argument `bias_correction` must be True or False. "
                f"Received: bias_correction={bias_correction!r}"
            )
        self.bias_correction = bias_correction

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums = self.add_optimizer_variables(var_list, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        mu = ops.convert_to_tensor(self.momentum, dtype)
        m = self._momentums[self._get_variable_index(variable)]
        if self.bias_correction:
            step = ops.cast(self.iterations + 1, dtype)
            lr = ops.divide(lr, 1 - ops.power(mu, step))
        if has_fused_kernels(gradient, dtype) and not in_xla():  # XLA fuses the ops path
            _update_in_place(variable, m, lr, mu, ops.cast(gradient, dtype))
            return
        g = dense_gradient(gradient, dtype)

        m_new = ops.add(ops.multiply(m, mu), ops.multiply(g, 1 - mu))
        self.assign(m, m_new)
        self.assign_sub(variable, ops.multiply(lr, m_new))

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, bias_correction=self.bias_correction)
        return config


def _update_in_place(variable, m, lr, mu, gradient):
    """The update with TensorFlow's kernels, in place: two passes over the arrays and no
    temporaries, where the `keras.ops` path allocates five arrays of the variable's size.

    TensorFlow has no EMA-momentum kernel. Its PowerSign kernel moves `m` exactly as the EMA
    does and, with `lr = 0`, leaves the variable unchanged; the gradient-descent kernel then
    subtracts `lr * m`.
    """
    import tensorflow as tf

    zero = tf.zeros([], gradient.dtype)
    tf.raw_ops.ResourceApplyPowerSign(
        var=resource_handle(variable),
        m=resource_handle(m),
        lr=zero,
        logbase=zero,
        sign_decay=zero,
        beta=mu,
        grad=gradient,
    )
    tf.raw_ops.ResourceApplyGradientDescent(
        var=resource_handle(variable), alpha=lr, delta=ops.convert_to_tensor(m)
    )
