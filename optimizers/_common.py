"""Helpers shared by the update rules."""

import keras
from keras import ops


def dense_gradient(gradient, dtype):
    """The gradient as a dense tensor of `dtype`.

    Sparse gradients (`tf.IndexedSlices` from `keras.layers.Embedding`) are densified: rows
    absent from the batch get a zero gradient. Duplicate indices are summed.
    """
    if hasattr(gradient, "indices") and hasattr(gradient, "dense_shape"):
        indices = ops.expand_dims(gradient.indices, -1)
        gradient = ops.scatter(indices, gradient.values, gradient.dense_shape)
    return ops.cast(gradient, dtype)


def has_fused_kernels(gradient, dtype):
    """TensorFlow's fused kernels serve dense float32/float64 gradients on its backend."""
    return (
        keras.backend.backend() == "tensorflow"
        and keras.backend.standardize_dtype(dtype) in ("float32", "float64")
        and not hasattr(gradient, "indices")
    )


def resource_handle(variable):
    """The resource handle of a (Keras or TensorFlow) variable, for TensorFlow's kernels."""
    return variable.value.handle if isinstance(variable, keras.Variable) else variable.handle


def in_xla():
    """Whether TensorFlow is tracing an XLA-compiled function (True when it cannot tell)."""
    try:
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util
    except ImportError:
        return True
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
