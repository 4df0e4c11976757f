"""AddSign (Bello et al., 2017)."""

import math

import keras
from keras import ops

from optiscope.optimizers._sign_rule import SignRule
from optiscope.optimizers._validation import check_in_range


@keras.saving.register_keras_serializable(package="optiscope")
class AddSign(SignRule):
    """AddSign: add to the gradient's scale where it agrees in sign with its running average.

    ```
    m <- beta * m + (1 - beta) * g
    w <- w - lr * (alpha + d(t) * sign(g) * sign(m)) * g
    ```
    `d(t)` is the sign decay at the 0-based step `t`. Matches TensorFlow's fused
    `ResourceApplyAddSign` kernel, which runs it on the TensorFlow backend for dense float32
    and float64 gradients. Sparse gradients are densified. Natural statistic:
    `sign_agreement`.

    Args:
        learning_rate: a positive float, a `LearningRateSchedule` or a callable.
            Defaults to 0.1.
        alpha: the constant part of the multiplier, >= 0. Defaults to 1.0.
        beta: the decay of the moving average `m`, in [0, 1). Defaults to 0.9.
        sign_decay: a number in [0, 1] or a sign decay schedule (`LinearSignDecay`,
            `CosineSignDecay`, `RestartSignDecay`). Defaults to 1.0.
        name: the optimizer's name. Defaults to "add_sign".
        **kwargs: base optimizer and instrumentation arguments.

    References:
        Bello et al., 2017, "Neural Optimizer Search with Reinforcement Learning",
        https://arxiv.org/abs/1709.07417

    Example:
    >>> import numpy as np
    >>> optimizer = AddSign(learning_rate=0.1)
    >>> w = keras.Variable(np.array([1.0], "float32"))
    >>> optimizer.apply([np.array([1.0], "float32")], [w])
    >>> round(float(w.numpy()[0]), 4)
    0.8
    """

    def __init__(
        self,
        learning_rate=0.1,
        alpha=1.0,
        beta=0.9,
        sign_decay=1.0,
        name="add_sign",
        **kwargs,
    ):
        alpha = check_in_range("alpha", alpha, 0, math.inf)
        super().__init__(learning_rate, beta, sign_decay, name, **kwargs)
        self.alpha = alpha

    def _multiplier(self, scaled_agreement, dtype):
        return ops.add(ops.convert_to_tensor(self.alpha, dtype), scaled_agreement)

    def _fused_kernel(self, dtype):
        import tensorflow as tf

        alpha = ops.convert_to_tensor(self.alpha, dtype)

        def apply(var, m, lr, sign_decay, beta, grad):
            tf.raw_ops.ResourceApplyAddSign(
                var=var, m=m, lr=lr, alpha=alpha, sign_decay=sign_decay, beta=beta, grad=grad
            )

        return apply

    def get_config(self):
        config = super().get_config()
        config["alpha"] = self.alpha
        return config
