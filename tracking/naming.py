"""Run names, flat parameter dictionaries and metric keys that back ends accept."""

import datetime
import json
import re

MLFLOW_KEY_LENGTH = 250
MLFLOW_PARAM_LENGTH = 6000
_MLFLOW_FORBIDDEN = re.compile(r"[^A-Za-z0-9_\-. :/]")


def run_name(prefix="run"):
    """`<prefix>-YYYYmmdd-HHMMSS-ffffff`: sortable and unique enough for one machine."""
    return f"{prefix}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"


def mlflow_key(key):
    """`key` with characters MLflow rejects replaced by `_`, and `..`/leading `/` removed,
    cut to MLflow's length limit."""
    key = _MLFLOW_FORBIDDEN.sub("_", str(key)).replace("..", "_").lstrip("/")
    return key[:MLFLOW_KEY_LENGTH] or "_"


def flatten(mapping, prefix=""):
    """Nested dictionaries as one level, keys joined with '.'; values made JSON-friendly."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def param_value(value):
    """A parameter as MLflow stores it: a string of bounded length."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MLFLOW_PARAM_LENGTH]
