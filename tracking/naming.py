"""Run names, flat parameter dictionaries and metric keys that back ends accept."""

import datetime
import hashlib
import json
import posixpath
import re

MLFLOW_KEY_LENGTH = 250
MLFLOW_PARAM_LENGTH = 6000
KEY_HEAD = 64  # characters kept from the start of a key cut to MLflow's length limit
KEY_PARAM_PREFIX = "optiscope.key."  # params mapping a rewritten key's hash to the full key
_MLFLOW_NAME = re.compile(r"^[A-Za-z0-9_\-. :/]+$")
_MLFLOW_FORBIDDEN = re.compile(r"[^A-Za-z0-9_\-. :/]")


def run_name(prefix="run"):
    """`<prefix>-YYYYmmdd-HHMMSS-ffffff`: sortable and unique enough for one machine."""
    return f"{prefix}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"


def key_hash(key):
    """8 hex digits of the SHA-1 of `key`: short, and the same in every process."""
    return hashlib.sha1(str(key).encode()).hexdigest()[:8]


def _mlflow_accepts(key):
    """MLflow's rule for metric and param names: allowed characters, a normalised relative
    path, at most 250 characters."""
    return (
        len(key) <= MLFLOW_KEY_LENGTH
        and bool(_MLFLOW_NAME.match(key))
        and posixpath.normpath(key) == key
        and not key.startswith(("/", ".."))
        and key != "."
    )


def mlflow_key(key):
    """`key` as MLflow takes it, and distinct keys stay distinct.

    A key MLflow accepts is kept as it is. Otherwise characters MLflow rejects become `_`,
    empty, `.` and `..` path parts go, and `_<hash>` (`key_hash` of the full key) is added; a
    key still longer than MLflow's limit keeps its first 64 and its last characters around the
    hash: `<head>_<hash>_<tail>`. `MlflowSink` records each such key's full name as the param
    `optiscope.key.<hash>`.
    """
    key = str(key)
    if _mlflow_accepts(key):
        return key
    parts = _MLFLOW_FORBIDDEN.sub("_", key).split("/")
    clean = "/".join(p for p in parts if p not in ("", ".")).replace("..", "_")
    digest = key_hash(key)
    if len(clean) + len(digest) + 1 <= MLFLOW_KEY_LENGTH:
        return f"{clean}_{digest}" if clean else f"_{digest}"
    tail = clean[len(clean) - (MLFLOW_KEY_LENGTH - KEY_HEAD - len(digest) - 2) :]
    return f"{clean[:KEY_HEAD]}_{digest}_{tail}"


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
