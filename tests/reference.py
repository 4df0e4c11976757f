"""NumPy reference implementations of the update rules, written from the update rules' formulas.

Nothing here imports optiscope: these are the formulas as written, so tests can run an
optimizer in lockstep with them. Every step function takes the variable, the gradient and the
optimizer state as NumPy arrays, computes in `dtype` (hyperparameters are Python floats cast to
`dtype`, as an optimizer casts its attributes), and returns the new variable and state in
`dtype`. `t` is the 0-based number of steps already applied.
"""

import math

import numpy as np


def _scalar_type(dtype):
    """`np.float32` for "float32", np.float32 or np.dtype("float32") alike."""
    return np.dtype(dtype).type


def _cast(dtype, *arrays):
    return tuple(np.asarray(a, dtype=dtype) for a in arrays)


def sign_averaging_step(w, g, prev_value, prev_grad, lr, dtype):
    """SignAveraging (§1.1). Returns `(w_new, prev_value_new, prev_grad_new)`."""
    dtype = _scalar_type(dtype)
    w, g, prev_value, prev_grad = _cast(dtype, w, g, prev_value, prev_grad)
    lr = dtype(lr)
    flip = g * prev_grad < 0
    w_descent = w - lr * g
    w_mid = w + (prev_value - w) / dtype(2)
    w_new = np.where(flip, w_mid, w_descent).astype(dtype)
    return w_new, w.copy(), g.copy()


def _sign_rule_step(w, g, m, lr, beta, decay, multiplier, dtype):
    w, g, m = _cast(dtype, w, g, m)
    beta = dtype(beta)
    m_new = beta * m + (dtype(1) - beta) * g
    scaled_agreement = dtype(decay) * np.sign(g) * np.sign(m_new)
    scale = multiplier(scaled_agreement)
    w_new = w - (dtype(lr) * scale) * g
    return w_new.astype(dtype), m_new.astype(dtype)


def power_sign_step(w, g, m, lr, base, beta, decay, dtype):
    """PowerSign (§1.2) with sign decay value `decay = d(t)`. Returns `(w_new, m_new)`."""
    dtype = _scalar_type(dtype)
    log_base = dtype(math.log(base))
    return _sign_rule_step(
        w, g, m, lr, beta, decay, lambda a: np.exp(log_base * a).astype(dtype), dtype
    )


def add_sign_step(w, g, m, lr, alpha, beta, decay, dtype):
    """AddSign (§1.2) with sign decay value `decay = d(t)`. Returns `(w_new, m_new)`."""
    dtype = _scalar_type(dtype)
    alpha = dtype(alpha)
    return _sign_rule_step(w, g, m, lr, beta, decay, lambda a: alpha + a, dtype)


def ema_momentum_step(w, g, m, t, lr, momentum, bias_correction, dtype):
    """EMA momentum (§1.3) at 0-based step `t`. Returns `(w_new, m_new)`."""
    dtype = _scalar_type(dtype)
    w, g, m = _cast(dtype, w, g, m)
    mu = dtype(momentum)
    m_new = mu * m + (dtype(1) - mu) * g
    m_hat = m_new / (dtype(1) - mu ** dtype(t + 1)) if bias_correction else m_new
    w_new = w - dtype(lr) * m_hat
    return w_new.astype(dtype), m_new.astype(dtype)


def linear_sign_decay(t, decay_steps, dtype=np.float64):
    """`d(t) = max(0, 1 - t/T)`, and 0 for `t >= T`."""
    dtype = _scalar_type(dtype)
    t, horizon = dtype(t), dtype(decay_steps)
    if t >= horizon:
        return dtype(0)
    return dtype(max(dtype(0), dtype(1) - t / horizon))


def cosine_sign_decay(t, decay_steps, num_periods=0.5, dtype=np.float64):
    """`d(t) = 0.5 * (1 + cos(2*pi*n*t/T))`, and 0 for `t >= T`."""
    dtype = _scalar_type(dtype)
    t, horizon = dtype(t), dtype(decay_steps)
    if t >= horizon:
        return dtype(0)
    angle = dtype(2 * math.pi * num_periods) * t / horizon
    return dtype(dtype(0.5) * (dtype(1) + np.cos(angle)))


def restart_sign_decay(t, decay_steps, num_periods=1.0, dtype=np.float64):
    """`d(t) = 0.5 * (1 + cos(pi * (t mod (T/n)) / (T/n)))`, and 0 for `t >= T`."""
    dtype = _scalar_type(dtype)
    t, horizon = dtype(t), dtype(decay_steps)
    if t >= horizon:
        return dtype(0)
    period = horizon / dtype(num_periods)
    fraction = np.mod(t, period) / period
    return dtype(dtype(0.5) * (dtype(1) + np.cos(dtype(math.pi) * fraction)))


SIGN_DECAYS = {
    "LinearSignDecay": linear_sign_decay,
    "CosineSignDecay": cosine_sign_decay,
    "RestartSignDecay": restart_sign_decay,
}
"""Reference sign decay by the name of the optiscope class that implements it."""


class ReferenceOptimizer:
    """One reference rule applied to a list of arrays, keeping per-array state and `t`.

    `rule` is "sign_averaging", "power_sign", "add_sign" or "ema_momentum"; hyperparameters are
    the optimizer's (`learning_rate`, `beta`, `base`, `alpha`, `sign_decay`, `momentum`,
    `bias_correction`). `sign_decay` is a number or a function of the 0-based step `t`, which
    is called with `dtype` as a keyword argument; `learning_rate` a number or a function of `t`.
    """

    _DEFAULTS = {
        "sign_averaging": {"learning_rate": 0.001},
        "power_sign": {"learning_rate": 0.1, "base": math.e, "beta": 0.9, "sign_decay": 1.0},
        "add_sign": {"learning_rate": 0.1, "alpha": 1.0, "beta": 0.9, "sign_decay": 1.0},
        "ema_momentum": {"learning_rate": 0.01, "momentum": 0.9, "bias_correction": False},
    }

    def __init__(self, rule, dtype, **hyperparameters):
        unknown = set(hyperparameters) - set(self._DEFAULTS[rule])
        if unknown:
            raise TypeError(f"Unknown hyperparameters for {rule}: {sorted(unknown)}")
        self.rule = rule
        self.dtype = _scalar_type(dtype)
        self.hyper = {**self._DEFAULTS[rule], **hyperparameters}
        self.t = 0
        self.state = None

    def _zeros(self, values):
        count = 2 if self.rule == "sign_averaging" else 1
        return [tuple(np.zeros(np.shape(v), self.dtype) for _ in range(count)) for v in values]

    def _at_t(self, value):
        return value(self.t) if callable(value) else value

    def apply(self, grads, values):
        """Returns the new values; `state[i]` holds the slots of `values[i]` afterwards."""
        if self.state is None:
            self.state = self._zeros(values)
        h, dtype = self.hyper, self.dtype
        lr = self._at_t(h["learning_rate"])
        decay = h.get("sign_decay")
        if callable(decay):
            decay = decay(self.t, dtype=dtype)
        new_values = []
        for i, (g, w) in enumerate(zip(grads, values, strict=True)):
            if self.rule == "sign_averaging":
                w, *slots = sign_averaging_step(w, g, *self.state[i], lr, dtype)
            elif self.rule == "power_sign":
                w, *slots = power_sign_step(
                    w, g, *self.state[i], lr, h["base"], h["beta"], decay, dtype
                )
            elif self.rule == "add_sign":
                w, *slots = add_sign_step(
                    w, g, *self.state[i], lr, h["alpha"], h["beta"], decay, dtype
                )
            else:
                w, *slots = ema_momentum_step(
                    w, g, *self.state[i], self.t, lr, h["momentum"], h["bias_correction"], dtype
                )
            self.state[i] = tuple(slots)
            new_values.append(w)
        self.t += 1
        return new_values
