"""Sinks: where optimizer statistics and run metadata go (TensorBoard, MLflow, nowhere)."""

from optiscope.tracking.base import NullSink, Sink, SinkList
from optiscope.tracking.journal import pending, replay
from optiscope.tracking.mlflow_sink import MlflowSink, check_tracking_uri
from optiscope.tracking.naming import flatten, mlflow_key, run_name
from optiscope.tracking.tensorboard import TensorBoardSink

__all__ = [
    "MlflowSink",
    "NullSink",
    "Sink",
    "SinkList",
    "TensorBoardSink",
    "check_tracking_uri",
    "flatten",
    "mlflow_key",
    "pending",
    "replay",
    "run_name",
]
