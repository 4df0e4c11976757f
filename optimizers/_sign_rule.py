"""The update shared by PowerSign and AddSign; they differ only in the gradient multiplier."""

import math
import numbers

import keras
from keras import ops

from optiscope.optimizers._common import dense_gradient, has_fused_kernels, resource_handle
from optiscope.optimizers._validation import check_in_range, check_learning_rate
from optiscope.optimizers.instrumentation import Instrumented
from optiscope.optimizers.sign_decay import SignDecay


def _check_sign_decay(sign_decay):
    if isinstance(sign_decay, SignDecay):
        return sign_decay
    if isinstance(sign_decay, numbers.Real) and not isinstance(sign_decay, bool):
        return check_in_range("sign_decay", sign_decay, 0, 1, high_closed=True)
    raise ValueError(
        "Argument `sign_decay` must be a number in [0, 1] or a sign decay schedule "
        "(LinearSignDecay, CosineSignDecay, RestartSignDecay). "
        f"Received: sign_decay={sign_decay!r}"
    )


class SignRule(Instrumented, keras.optimizers.Optimizer):
    """`m <- beta*m + (1-beta)*g;  w <- w - lr * multiplier(d(t) * sign(g) * sign(m)) * g`."""

    _sign_reference_slot = "m"
    _natural_statistics = ("sign_agreement",)

    def __init__(self, learning_rate, beta, sign_decay, name, **kwargs):
        super().__init__(learning_rate=check_learning_rate(learning_rate), name=name, **kwargs)
        self.beta = check_in_range("beta", beta, 0, 1)
        self.sign_decay = _check_sign_decay(sign_decay)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._m = self.add_optimizer_variables(var_list, "m")

    def _decay_value(self, dtype):
        """d(t) at the 0-based step t = `iterations` before this update."""
        if isinstance(self.sign_decay, SignDecay):
            return ops.cast(self.sign_decay(ops.cast(self.iterations, dtype)), dtype)
        return ops.convert_to_tensor(self.sign_decay, dtype)

    def _multiplier(self, scaled_agreement, dtype):
        raise NotImplementedError

    def _fused_kernel(self, dtype):
        """This rule's TensorFlow kernel as `apply(var, m, lr, sign_decay, beta, grad)`."""
        raise NotImplementedError

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        m = self._m[self._get_variable_index(variable)]
        beta = ops.convert_to_tensor(self.beta, dtype)
        if has_fused_kernels(gradient, dtype):  # one pass over the arrays instead of ~10
            kernel = self._fused_kernel(dtype)
            g = ops.cast(gradient, dtype)
            kernel(
                resource_handle(variable), resource_handle(m), lr, self._decay_value(dtype), beta, g
            )
            return
        g = dense_gradient(gradient, dtype)

        m_new = ops.add(ops.multiply(m, beta), ops.multiply(g, 1 - beta))
        self.assign(m, m_new)
        agreement = ops.multiply(ops.sign(g), ops.sign(m_new))
        scale = self._multiplier(ops.multiply(self._decay_value(dtype), agreement), dtype)
        self.assign_sub(variable, ops.multiply(ops.multiply(lr, scale), g))

    def get_config(self):
        config = super().get_config()
        config["beta"] = self.beta
        config["sign_decay"] = (
            keras.saving.serialize_keras_object(self.sign_decay)
            if isinstance(self.sign_decay, SignDecay)
            else self.sign_decay
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if isinstance(config.get("sign_decay"), dict):
            config["sign_decay"] = keras.saving.deserialize_keras_object(
                config["sign_decay"], custom_objects=custom_objects
            )
        return super().from_config(config, custom_objects=custom_objects)


def log_of(name, base):
    return math.log(check_in_range(name, base, 0, math.inf, low_closed=False))
