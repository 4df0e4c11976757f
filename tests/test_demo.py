"""The quick-start job trains three instrumented optimizers and tracks them."""

import math

import mlflow

from optiscope.experiments import demo


def test_demo_trains_logs_and_reports(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    results = demo.run(epochs=1, logdir=str(tmp_path / "runs"), tracking_uri=uri)
    assert set(results) == {"SignAveraging", "SGD-momentum", "Adam"}
    for loss, stats in results.values():
        assert math.isfinite(loss) and stats.step == 645  # 20640 rows / batch 32
        assert stats["grad_norm", "hidden/kernel"].last > 0
        assert stats["weight_norm", "output/bias"].last >= 0
    assert len(list((tmp_path / "runs" / "demo").iterdir())) == 3
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name(demo.EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
    assert all("optimizer/grad_norm/hidden/kernel" in r.data.metrics for r in runs)
