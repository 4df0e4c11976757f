"""Helpers shared by the update rules."""

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
