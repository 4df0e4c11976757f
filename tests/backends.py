"""What the tests need to know about the Keras backend they run on (`KERAS_BACKEND`)."""

import keras

BACKEND = keras.backend.backend()


def compiled(fn):
    """`fn` as a traced graph function on TensorFlow; as it is on other backends, whose
    eager calls are the only way to mutate variables from Python (JAX compiles stateless
    functions: see `compiled_apply`)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    return fn


def compiled_apply(optimizer, variables):
    """`(apply, traces)`: `apply(grads)` runs `optimizer.apply(grads, variables)` as one compiled
    step (`tf.function` on TensorFlow, `jax.jit` of `stateless_apply` on JAX, writing the results
    back), and `traces()` counts how often it was traced."""
    count = [0]

    if BACKEND == "jax":
        import jax

        @jax.jit
        def step(optimizer_values, variable_values, grads):
            count[0] += 1  # runs at trace time only
            return optimizer.stateless_apply(optimizer_values, grads, variable_values)

        def apply(grads):
            new_values, new_optimizer_values = step(
                [v.value for v in optimizer.variables], [v.value for v in variables], grads
            )
            for variable, value in zip(variables, new_values, strict=True):
                variable.assign(value)
            for variable, value in zip(optimizer.variables, new_optimizer_values, strict=True):
                variable.assign(value)

        return apply, lambda: count[0]

    def traced(grads):
        count[0] += 1  # runs at trace time only
        optimizer.apply(grads, variables)

    function = compiled(traced)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return (lambda grads: function([tf.constant(g) for g in grads])), lambda: count[0]
    return function, lambda: count[0]
