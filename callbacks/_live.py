"""Reading optimizer state while `model.fit` runs, on every backend.

During an epoch Keras' JAX trainer keeps the live variable values outside the model and leaves
the model's own variables empty; `model.jax_state_sync()` writes them back (and the next step
takes them from there). So on JAX a read of the statistics syncs first, on the training thread:
never from Keras' callback threads, which would race with the next step.
"""

import sys

import keras


def trainer_holds_state():
    """True where `model.fit` keeps live values outside the model's variables (JAX)."""
    return keras.backend.backend() == "jax"


def sync(model):
    """Writes the trainer's live values back into the model's variables (JAX); a no-op on other
    backends. Call it on the training thread only."""
    if trainer_holds_state() and model is not None:
        model.jax_state_sync()


def check_no_strategy():
    """Raises if a `tf.distribute` strategy is in scope on a backend that ignores it."""
    tf = sys.modules.get("tensorflow")  # a strategy exists only if TensorFlow was imported
    backend = keras.backend.backend()
    if backend == "tensorflow" or tf is None or not tf.distribute.has_strategy():
        return
    raise RuntimeError(
        f"A tf.distribute strategy is in scope, but the Keras backend is {backend!r}: "
        "tf.distribute strategies work only on the TensorFlow backend (this model would train "
        "on one device). Set KERAS_BACKEND=tensorflow, or distribute with keras.distribution."
    )


def is_chief_process():
    """False in the processes other than the first of a multi-process JAX run."""
    if keras.backend.backend() != "jax":
        return True
    import jax

    return jax.process_index() == 0
