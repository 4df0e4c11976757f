"""Shared pytest set-up: quiet TensorFlow, reproducible Keras randomness, backend markers."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is first imported

import keras  # noqa: E402
import pytest  # noqa: E402
from backends import BACKEND  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skips `tensorflow_only` tests on other backends."""
    if BACKEND == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"needs the TensorFlow backend; KERAS_BACKEND is {BACKEND}")
    for item in items:
        if item.get_closest_marker("tensorflow_only"):
            item.add_marker(skip)


@pytest.fixture
def keras_seed():
    """Resets Python's, NumPy's and the backend's random seeds; returns the seed."""
    seed = 42
    keras.utils.set_random_seed(seed)
    return seed


@pytest.fixture
def mixed_float16():
    """Runs a test under the mixed_float16 policy, restoring float32 afterwards."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="session")
def team_server():
    """One PostgreSQL-backed MLflow tracking server (as `optiscope server` starts it) for the
    session; skips with the reason when PostgreSQL or its driver is absent."""
    import servers

    reason = servers.postgres_missing()
    if reason:
        pytest.skip(reason)
    with servers.team_server() as team:
        yield team
