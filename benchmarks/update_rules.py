"""Cost of one optimizer step on a 10-million-element float32 variable.

Each optimizer step runs as a compiled `tf.function` (graph, and XLA with jit_compile=True),
side by side with TensorFlow's fused kernels (`tf.raw_ops.ResourceApply*`) and Keras' Adam.
Prints ms/step, the ratio to the reference and the achieved bandwidth (the bytes the rule must
read and write, divided by the time) as a fraction of this machine's measured copy bandwidth.

    python benchmarks/update_rules.py [--size 10000000] [--rounds 7]

Every array a `keras.ops` call returns is a fresh allocation of the variable's size; with
TensorFlow's default CPU allocator (malloc, which maps arrays over 32 MB fresh from the kernel)
its page faults cost more than the arithmetic. `TF_CPU_ALLOCATOR_USE_BFC=true` in the
environment makes TensorFlow reuse its buffers; run the script both ways to see the two.
"""

import argparse
import os

import _timing
import keras
import numpy as np
import tensorflow as tf

from optiscope import optimizers

FLOAT = 4  # bytes


def copy_bandwidth(size, rounds):
    """GB/s of a NumPy array copy (read + write), the machine's practical memory bandwidth."""
    a, b = np.random.rand(size).astype("float32"), np.empty(size, "float32")
    times = _timing.interleaved({"copy": lambda: np.copyto(b, a)}, rounds, repeats=5)
    return 2 * size * FLOAT / times["copy"] / 1e9


def keras_step(make_optimizer, size, jit):
    variable = keras.Variable(np.full(size, 0.5, "float32"))
    gradient = tf.random.normal([size], seed=1)
    optimizer = make_optimizer()
    optimizer.build([variable])
    step = tf.function(lambda: optimizer.apply([gradient], [variable]), jit_compile=jit)
    step()
    return step


def fused_step(kind, size):
    var = tf.Variable(tf.fill([size], 0.5))
    slots = [tf.Variable(tf.zeros([size])) for _ in range(2)]
    grad = tf.random.normal([size], seed=1)
    lr, beta = tf.constant(0.01), tf.constant(0.9)
    raw = tf.raw_ops

    def power_sign():
        raw.ResourceApplyPowerSign(
            var=var.handle,
            m=slots[0].handle,
            lr=lr,
            logbase=tf.constant(1.0),
            sign_decay=tf.constant(1.0),
            beta=beta,
            grad=grad,
        )

    def add_sign():
        raw.ResourceApplyAddSign(
            var=var.handle,
            m=slots[0].handle,
            lr=lr,
            alpha=tf.constant(1.0),
            sign_decay=tf.constant(1.0),
            beta=beta,
            grad=grad,
        )

    def momentum():
        raw.ResourceApplyKerasMomentum(
            var=var.handle, accum=slots[0].handle, lr=lr, grad=grad, momentum=beta
        )

    def adam():
        raw.ResourceApplyAdam(
            var=var.handle,
            m=slots[0].handle,
            v=slots[1].handle,
            beta1_power=tf.constant(0.9),
            beta2_power=tf.constant(0.999),
            lr=lr,
            beta1=beta,
            beta2=tf.constant(0.999),
            epsilon=tf.constant(1e-7),
            grad=grad,
        )

    fn = tf.function(
        {"power_sign": power_sign, "add_sign": add_sign, "momentum": momentum, "adam": adam}[kind]
    )
    fn()
    return fn


# name: (optimizer factory, fused reference, arrays read + written per element)
RULES = {
    "SignAveraging": (lambda s: optimizers.SignAveraging(0.01, statistics=s), None, 7),
    "PowerSign": (lambda s: optimizers.PowerSign(0.01, statistics=s), "power_sign", 5),
    "AddSign": (lambda s: optimizers.AddSign(0.01, statistics=s), "add_sign", 5),
    "EMAMomentum": (lambda s: optimizers.EMAMomentum(0.01, statistics=s), "momentum", 5),
    "EMAMomentum(bias_correction)": (
        lambda s: optimizers.EMAMomentum(0.01, bias_correction=True, statistics=s),
        "momentum",
        5,
    ),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    size = args.size
    print(f"# update-rule cost, {size:,} float32 elements; {_timing.machine()}")
    bfc = os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() in ("1", "true")
    print(f"CPU allocator: {'BFC' if bfc else 'default'} (TF_CPU_ALLOCATOR_USE_BFC)")
    bandwidth = copy_bandwidth(size, args.rounds)
    print(f"measured copy bandwidth: {bandwidth:.1f} GB/s\n")

    variants = {
        "keras Adam (graph)": keras_step(lambda: keras.optimizers.Adam(0.01), size, False),
        "keras Adam (XLA)": keras_step(lambda: keras.optimizers.Adam(0.01), size, True),
    }
    for kind in ("power_sign", "add_sign", "momentum", "adam"):
        variants[f"fused {kind}"] = fused_step(kind, size)
    for name, (make, _, _) in RULES.items():
        variants[f"{name} (graph)"] = keras_step(lambda m=make: m(None), size, False)
        variants[f"{name} (XLA)"] = keras_step(lambda m=make: m(None), size, True)
        variants[f"{name} (graph, default stats)"] = keras_step(
            lambda m=make: m("default"), size, False
        )
        variants[f"{name} (XLA, default stats)"] = keras_step(
            lambda m=make: m("default"), size, True
        )
    times = _timing.interleaved(variants, args.rounds)

    adam = min(times["keras Adam (graph)"], times["keras Adam (XLA)"])
    print(f"{'variant':<52}{'ms/step':>9}{'vs ref':>8}{'GB/s':>7}{'of copy':>9}")
    rows = [
        ("keras Adam (graph)", None, 7),
        ("keras Adam (XLA)", None, 7),
        ("fused adam", None, 7),
        ("fused power_sign", None, 5),
        ("fused add_sign", None, 5),
        ("fused momentum", None, 5),
    ]
    for name, (_, fused, arrays) in RULES.items():
        reference = min(times[f"fused {fused}"], adam) if fused else adam
        for suffix in ("graph", "XLA", "graph, default stats", "XLA, default stats"):
            rows.append((f"{name} ({suffix})", reference, arrays))
    for name, reference, arrays in rows:
        t = times[name]
        gbs = arrays * size * FLOAT / t / 1e9
        ratio = f"{t / reference:.2f}x" if reference else "-"
        print(f"{name:<52}{t * 1e3:>9.2f}{ratio:>8}{gbs:>7.1f}{gbs / bandwidth:>9.0%}")
    print("\nvs ref: ratio to the best of (the fused kernel of the same rule, Keras' Adam).")


if __name__ == "__main__":
    main()
