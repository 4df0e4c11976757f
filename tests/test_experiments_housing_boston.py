"""The housing and Boston experiments: splits, quick runs, the Boston collapse, missing data."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from shared_data import BOSTON, CALIFORNIA, data_file


def test_housing_split_sizes_and_scaler_fitted_on_train_only():
    from sklearn.model_selection import train_test_split

    from optiscope.experiments import data, housing

    x, y = data.california_housing(data_file(CALIFORNIA))
    parts, scaler = housing.split(x, y)
    assert {k: len(v[0]) for k, v in parts.items()} == {"train": 11610, "valid": 3870, "test": 5160}
    assert all(len(xs) == len(ys) and xs.dtype == np.float32 for xs, ys in parts.values())
    np.testing.assert_allclose(parts["train"][0].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(parts["train"][0].std(0), 1, atol=1e-4)
    assert np.abs(parts["valid"][0].mean(0)).max() > 1e-3  # scaled with the train statistics
    full, _, y_full, _ = train_test_split(x, y, random_state=42)
    train, _, _, _ = train_test_split(full, y_full, random_state=42)
    np.testing.assert_allclose(scaler.mean_, train.mean(0))
    assert scaler.n_samples_seen_ == 11610


def test_boston_split_matches_keras():
    from optiscope.experiments import boston, data

    (x_train, y_train), (x_test, y_test) = data.boston_housing(data_file(BOSTON))
    assert x_train.shape == (404, 13) and x_test.shape == (102, 13)
    np.testing.assert_array_equal(
        x_train[0], [1.23247, 0, 8.14, 0, 0.538, 6.142, 91.7, 3.9769, 4, 307, 21, 396.9, 18.72]
    )
    np.testing.assert_array_equal(
        y_train[:10], [15.2, 42.3, 50, 21.1, 17.7, 18.5, 11.3, 15.6, 15.6, 14.4]
    )
    assert x_test[0, 0] == 18.0846 and y_test[0] == 7.2
    assert round(y_train.mean(), 6) == 22.395050 and round(y_test.mean(), 6) == 23.078431
    parts = boston.load(boston.Config(data=data_file(BOSTON)))
    np.testing.assert_array_equal(parts["train"][0], x_train.astype("float32"))  # not scaled


@pytest.mark.slow
@pytest.mark.parametrize("name, path", [("housing", CALIFORNIA), ("boston", BOSTON)])
def test_quick_run_returns_result_and_writes_files(name, path, tmp_path, monkeypatch, capsys):
    import importlib

    from optiscope.experiments import harness

    module = importlib.import_module(f"optiscope.experiments.{name}")
    config = module.Config.quick(data=data_file(path))
    if name == "housing":  # tracked into a local MLflow store and a TensorBoard log dir
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        options = harness.Options(
            out=str(tmp_path), logdir=str(tmp_path / "runs"), tracking_uri=uri, progress=False
        )
        result = harness.run_tracked(module, config, options)
        files = result.files
        check_housing_grid_runs(result.tracker, config, uri)
    else:  # untracked, with the epochs of every fit on the (plain) progress line
        monkeypatch.setattr(harness, "PLAIN_INTERVAL", 0.0)
        options = harness.Options(track=False, fit_progress=True)
        result = module.run(config, options=options)
        files = harness.write(result, str(tmp_path))
        check_fit_progress(capsys.readouterr().err, config)
    assert isinstance(result, harness.Result) and result.experiment == module.NAME == name
    assert result.records and result.notes and result.reference
    assert all(c in r for r in result.records for c in result.columns if c != "seconds")
    assert set(result.reference_columns) >= set(module.REFERENCE_COLUMNS)
    expected = {"json", "csv", "md", *result.figures}
    assert set(files) == expected and len(result.figures) == 2
    assert all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in files.values())
    written = json.loads(Path(files["json"]).read_text())
    assert len(written["records"]) == len(result.records)
    assert result.table() in Path(files["md"]).read_text()
    if name == "housing":
        published = [r for r in written["records"] if r.get("variant") == "as_published"]
        assert [r["optimizer"] for r in published] == [module.AS_PUBLISHED]
        assert len(published[0]["train_loss"]) == config.epochs
        assert published[0]["seed_list"] == list(config.as_published_seed_list)
    else:
        studied = [r for r in written["records"] if "seeds_best_test_mse_median" in r]
        assert len(studied) == 1 + len(config.rescues)  # the collapse and each rescue
        for record in studied:
            values = record["seeds_best_test_mse_values"]
            assert len(values) == config.seeds and values[0] == record["best_test_mse"]
            assert record["seeds_best_test_mse_min"] <= record["seeds_best_test_mse_median"]


def check_fit_progress(stderr, config):
    """Every setting's fit reported its epochs (Keras epochs: `chunk` epochs each), to the end."""
    import re

    reported = {}
    for label, done, total in re.findall(r", (.+?): epoch (\d+)/(\d+) \(", stderr):
        reported.setdefault(label, []).append((int(done), int(total)))
    settings = [setting.label for setting in config.settings()]
    assert set(settings) <= set(reported)
    for label in settings:
        counts = reported[label]
        total = counts[-1][1]
        assert [done for done, _ in counts] == list(range(total + 1))
        assert all(t == total for _, t in counts) and total > 1


def check_housing_grid_runs(tracker, config, uri):
    """Each tuning run is a grid setting: nested under the parent run in MLflow, with its
    per-epoch loss over the tuning budget, and under `grid/` in TensorBoard."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("optiscope-housing")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`optiscope.role` = 'parent'")
    grid = client.search_runs([experiment.experiment_id], "tags.`optiscope.role` = 'grid'")
    expected = {f"{name}/lr={lr:g}" for name in config.optimizers for lr in config.learning_rates}
    assert {run.data.tags["optiscope.setting"] for run in grid} == expected
    for run in grid:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.params["epochs"] == str(config.tuning_epochs)
        history = client.get_metric_history(run.info.run_id, "epoch/loss")
        assert [m.step for m in history] == list(range(1, config.tuning_epochs + 1))
    board = Path(tracker.tensorboard_dir) / "grid"
    assert sorted(p.name for p in board.iterdir()) == sorted(config.optimizers)


def test_housing_quick_config_is_small():
    from optiscope.experiments import housing

    config = housing.Config.quick(seed=7)
    assert (config.epochs, len(config.learning_rates), config.seeds) == (2, 2, 1)
    assert config.seed_list == (7,) and housing.Config().seed_list == (42, 43, 44)


def test_boston_collapse_at_lr_1e3_shows_in_the_statistics():
    from optiscope.experiments import boston

    config = boston.Config(data=data_file(BOSTON), epochs=3000)
    parts = boston.load(config)
    record, curves = boston.train(boston.Setting("full-batch GD", 1e-3), config, parts)
    logged = curves["zero_grad"]
    assert len(logged) == 30 and logged[0, 0] == 100  # one logged window per 100 epochs
    np.testing.assert_allclose(logged[1:, 1], 1.0, rtol=0, atol=1e-12)  # window means
    assert record["hidden_zero_grad_fraction"] == 1.0 and record["hidden_units_alive"] == 0
    mean_target = parts["train"][1].astype("float64").mean()
    assert abs(record["output_bias"] - mean_target) < 0.1
    constant = np.mean((mean_target - parts["test"][1]) ** 2)
    assert record["final_test_mse"] == pytest.approx(constant, rel=0.01)  # a constant predictor
    bias = curves["bias"]
    assert len(bias) == 3000 and (np.diff(bias[100:]) > 0).all()  # settling on the mean


def test_boston_clipping_keeps_the_hidden_layer_alive():
    from optiscope.experiments import boston

    config = boston.Config(data=data_file(BOSTON), epochs=3000)
    setting = boston.Setting("clipnorm 2", 1e-3, clipnorm=2.0)
    record, _ = boston.train(setting, config, boston.load(config))
    assert record["hidden_zero_grad_fraction"] < 1.0
    assert record["best_test_mse"] < 80


@pytest.mark.parametrize("loader", ["california_housing", "boston_housing"])
def test_missing_path_raises_data_unavailable(loader, tmp_path):
    from optiscope.experiments import data

    missing = str(tmp_path / "nowhere.csv.gz")
    with pytest.raises(data.DataUnavailable, match="nowhere.csv.gz"):
        getattr(data, loader)(missing)


@pytest.mark.parametrize("loader", ["california_housing", "boston_housing"])
def test_missing_path_message_says_how_to_providedata_file(loader, tmp_path):
    from optiscope.experiments import data

    with pytest.raises(data.DataUnavailable) as raised:
        getattr(data, loader)(str(tmp_path / "nowhere.csv.gz"))
    message = str(raised.value)
    assert "--data" in message and ("OPTISCOPE_" in message or "CSV" in message)


def test_cli_prints_data_unavailable_without_traceback(tmp_path):
    script = Path(sys.executable).with_name("optiscope")  # the console script of this venv
    command = (
        [str(script)] if script.exists() else [sys.executable, "-m", "optiscope.experiments.cli"]
    )
    done = subprocess.run(
        [*command, "run", "housing", "--data", "/nonexistent", "--no-track"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "optiscope run housing:" in done.stderr and "/nonexistent" in done.stderr
    assert not (tmp_path / "results").exists()


def test_boston_setting_labels_sort_in_numeric_order():
    from optiscope.experiments import boston

    rates = boston.Config().learning_rates
    labels = [boston.Setting("full batch", rate).label for rate in rates]
    by_name = sorted(labels)
    by_rate = [boston.Setting("full batch", rate).label for rate in sorted(rates)]
    assert by_name == by_rate
    assert [float(label.split("lr=")[1]) for label in by_name] == sorted(rates)
