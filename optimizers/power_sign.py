"""PowerSign (Bello et al., 2017)."""

import math

import keras
from keras import ops

from optiscope.optimizers._sign_rule import SignRule, log_of


@keras.saving.register_keras_serializable(package="optiscope")
class PowerSign(SignRule):
    """PowerSign: scale the gradient up where it agrees in sign with its running average.

    ```
    m <- beta * m + (1 - beta) * g
    w <- w - lr * exp(log(base) * d(t) * sign(g) * sign(m)) * g
    ```
    `d(t)` is the sign decay at the 0-based step `t`. Matches TensorFlow's fused
    `ResourceApplyPowerSign` kernel, which runs it on the TensorFlow backend for dense float32
    and float64 gradients. Sparse gradients are densified. Natural statistic:
    `sign_agreement`.

    Args:
        learning_rate: a positive float, a `LearningRateSchedule` or a callable.
            Defaults to 0.1.
        base: the base of the multiplier, > 0 (1 gives SGD). Defaults to e.
        beta: the decay of the moving average `m`, in [0, 1). Defaults to 0.9.
        sign_decay: a number in [0, 1] or a sign decay schedule (`LinearSignDecay`,
            `CosineSignDecay`, `RestartSignDecay`). Defaults to 1.0.
        name: the optimizer's name. Defaults to "power_sign".
        **kwargs: base optimizer and instrumentation arguments.

    References:
        Bello et al., 2017, "Neural Optimizer Search with Reinforcement Learning",
        https://arxiv.org/abs/1709.07417

    Example:
    >>> import numpy as np
    >>> optimizer = PowerSign(learning_rate=0.1, base=2.0)
    >>> w = keras.Variable(np.array([1.0], "float32"))
    >>> optimizer.apply([np.array([1.0], "float32")], [w])
    >>> round(float(w.numpy()[0]), 4)
    0.8
    """

    def __init__(
        self,
        learning_rate=0.1,
        base=math.e,
        beta=0.9,
        sign_decay=1.0,
        name="power_sign",
        **kwargs,
    ):
        log_base = log_of("base", base)
        super().__init__(learning_rate, beta, sign_decay, name, **kwargs)
        self.base = float(base)
        self._log_base = log_base

    def _multiplier(self, scaled_agreement, dtype):
        return ops.exp(ops.multiply(ops.convert_to_tensor(self._log_base, dtype), scaled_agreement))

    def _fused_kernel(self, dtype):
        import tensorflow as tf

        log_base = ops.convert_to_tensor(self._log_base, dtype)

        def apply(var, m, lr, sign_decay, beta, grad):
            tf.raw_ops.ResourceApplyPowerSign(
                var=var, m=m, lr=lr, logbase=log_base, sign_decay=sign_decay, beta=beta, grad=grad
            )

        return apply

    def get_config(self):
        config = super().get_config()
        config["base"] = self.base
        return config
