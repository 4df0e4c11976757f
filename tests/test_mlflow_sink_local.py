"""MlflowSink against a real local MLflow store (SQLite): params that change value."""

import mlflow
import pytest

from optiscope.tracking import MlflowSink


def test_param_logged_again_with_another_value_is_kept_under_a_new_key(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sink = MlflowSink(tracking_uri=uri, run_name="p", spool_dir=str(tmp_path / "spool"))
    sink.log_params({"data": "first", "lr": 0.1})
    with pytest.warns(RuntimeWarning, match="'data'.*kept as 'data_2'"):
        sink.log_params({"data": "second", "lr": 0.1})
    sink.log_metrics({"loss": 1.5}, step=1)
    sink.close()
    run = mlflow.tracking.MlflowClient(uri).get_run(sink.run_id)
    assert run.data.params == {"data": "first", "data_2": "second", "lr": "0.1"}
    assert run.data.metrics == {"loss": 1.5}
    assert run.info.status == "FINISHED"
    assert sink.spool_path is None and not (tmp_path / "spool").exists()


def test_a_spool_directory_that_already_existed_is_left_in_place(tmp_path):
    # Processes that share a spool directory must not remove it from under each other.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    shared = tmp_path / "shared"
    shared.mkdir()
    sink = MlflowSink(tracking_uri=uri, run_name="s", spool_dir=str(shared))
    sink.log_metrics({"loss": 1.0}, step=1)
    sink.close()
    assert sink.spool_path is None
    assert shared.is_dir() and list(shared.iterdir()) == []
