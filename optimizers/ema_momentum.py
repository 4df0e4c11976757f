"""Exponential-moving-average momentum, with or without bias correction."""

import keras
from keras import ops

from optiscope.optimizers._common import dense_gradient
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
    with it, the first steps track plain SGD at `lr`. Sparse gradients are densified.

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
        g = dense_gradient(gradient, dtype)
        mu = ops.convert_to_tensor(self.momentum, dtype)
        m = self._momentums[self._get_variable_index(variable)]

        m_new = ops.add(ops.multiply(m, mu), ops.multiply(g, 1 - mu))
        self.assign(m, m_new)
        if self.bias_correction:
            step = ops.cast(self.iterations + 1, dtype)
            m_new = ops.divide(m_new, 1 - ops.power(mu, step))
        self.assign_sub(variable, ops.multiply(lr, m_new))

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, bias_correction=self.bias_correction)
        return config
