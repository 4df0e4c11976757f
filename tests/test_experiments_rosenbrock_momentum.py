"""The Rosenbrock and momentum experiments: the objective, the vectorised loop against runs
alone and a NumPy reference, the learning-rate rule, the result files, the momentum claims."""

import json

import keras
import numpy as np
import pytest

from optiscope.experiments import harness, momentum, rosenbrock

# ----------------------------------------------------------------------------- Rosenbrock


def test_rosenbrock_hand_values():
    assert rosenbrock.rosenbrock(1.0, 1.0) == 0.0
    assert rosenbrock.rosenbrock(0.0, 0.0) == 1.0
    assert rosenbrock.rosenbrock(-1.0, 1.0) == 4.0
    # (1 + 2.39)^2 + 100 (-1.57 - 2.39^2)^2 = 11.4921 + 100 * 7.2821^2
    assert rosenbrock.rosenbrock(-2.39, -1.57) == pytest.approx(5314.390141, rel=1e-12)


def test_rosenbrock_keras_ops_equals_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-3, 3, (2, 50))
    expected = rosenbrock.rosenbrock(x, y)
    got = keras.ops.convert_to_numpy(rosenbrock.rosenbrock(x, y, xp=keras.ops))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    got32 = rosenbrock.rosenbrock(x.astype("float32"), y.astype("float32"), xp=keras.ops)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got32), expected, rtol=1e-5)


def _gradient(x, y):
    return -2 * (1 - x) - 400 * x * (y - x**2), 200 * (y - x**2)


def test_sgd_in_the_batch_matches_numpy_float32():
    config = rosenbrock.Config(starts=3)
    points = rosenbrock.starting_points(config)
    make = rosenbrock.optimizers(config)["SGD"]
    lr, steps = 1e-4, 6
    path = rosenbrock.compile_runs(make, points)(lr, steps)
    x, y = points[:, 0].copy(), points[:, 1].copy()
    expected = [points]
    for _ in range(steps):
        gx, gy = _gradient(x, y)
        x, y = x - np.float32(lr) * gx, y - np.float32(lr) * gy
        expected.append(np.stack([x, y], axis=1))
    np.testing.assert_allclose(path, np.array(expected, "float64"), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(rosenbrock.optimizers(rosenbrock.Config())))
def test_rows_are_independent_runs(name):
    """The post's start run in the batch (after another learning rate on the same compiled
    loop) equals the same optimizer run alone on a (1, 2) variable."""
    config = rosenbrock.Config(starts=6)
    points = rosenbrock.starting_points(config)
    make = rosenbrock.optimizers(config)[name]
    lr, steps = (1e-2 if name in ("Adam", "RMSprop") else 1e-4), 250
    batch = rosenbrock.compile_runs(make, points)
    batch(lr * 3, steps)  # the next run must start from the freshly built state
    together = batch(lr, steps)
    alone = rosenbrock.compile_runs(make, points[:1])(lr, steps)
    assert np.isfinite(alone).all()
    np.testing.assert_array_equal(together[:, :1], alone)  # bit for bit


def test_divergence_is_recorded():
    points = np.array([[-2.39, -1.57], [1.0, 1.0]], "float32")
    make = rosenbrock.optimizers(rosenbrock.Config())["SGD"]
    summary = rosenbrock.summarize(rosenbrock.compile_runs(make, points)(0.1, 200))
    assert summary["diverged"].tolist() == [True, False]
    assert np.isnan(summary["distances"][-1, 0]) and summary["distances"][-1, 1] == 0.0
    assert summary["diverged_starts"] == 0 and summary["median_distance"] == 0.0


@pytest.fixture(scope="module")
def quick():
    return rosenbrock.run(rosenbrock.Config.quick())


def test_quick_run_records(quick):
    config = rosenbrock.Config.quick()
    assert isinstance(quick, harness.Result)
    paper = [r for r in quick.records if r["variant"] != "as_published"]
    published = [r for r in quick.records if r["variant"] == "as_published"]
    assert [r["optimizer"] for r in paper] == list(rosenbrock.optimizers(config))
    assert [r["optimizer"] for r in published] == ["RMSprop", "AddSign", "PowerSign"]
    steps = ["step 1", "step 501", f"step {config.steps}"]
    assert quick.columns == [
        "optimizer", "variant", "learning_rate", *steps, "final_distance", "median_distance",
        "best_distance", "diverged",
    ]  # fmt: skip
    for record in published:
        assert record["learning_rate"] in config.as_published_rates()
        assert record["points"] == {"1": record["step 1"], "501": record["step 501"]}
    for record in quick.records:
        if record in paper:
            assert record["learning_rate"] in config.learning_rates
            assert [g["learning_rate"] for g in record["grid"]] == list(config.learning_rates)
        for step in steps:
            x, y, f = record[step]
            if np.isfinite(f):
                assert f == pytest.approx(rosenbrock.rosenbrock(x, y), rel=1e-9)
        x, y, _ = record[f"step {config.steps}"]
        assert record["final_distance"] == pytest.approx(np.hypot(x - 1, y - 1))
        assert record["diverged"].endswith(f"/{config.starts}")
    post = [{c: row[c] for c in rosenbrock.REFERENCE_COLUMNS} for row in quick.reference]
    assert post == [r for r in rosenbrock.REFERENCE if r["step"] <= config.steps]
    assert any("PowerSign converges extremely fast early" in note for note in quick.notes)


def test_learning_rate_rule(quick):
    """Fewest diverged random starts, then the lowest median final distance, then smaller lr."""
    for record in quick.records:
        if record["variant"] == "as_published":
            continue
        grid = record["grid"]
        fewest = min(g["diverged"] for g in grid)
        eligible = [g for g in grid if g["diverged"] == fewest]
        best = min(np.nan_to_num(g["median_distance"], nan=np.inf) for g in eligible)
        chosen = next(g for g in grid if g["learning_rate"] == record["learning_rate"])
        assert chosen["diverged"] == fewest
        assert np.nan_to_num(chosen["median_distance"], nan=np.inf) == best
        assert record["median_distance"] == chosen["median_distance"]


def test_choose_prefers_no_divergence_then_median_then_smaller_rate():
    grid = {
        1e-3: {"diverged_starts": 1, "median_distance": 0.0},
        1e-2: {"diverged_starts": 0, "median_distance": 0.5},
        1e-1: {"diverged_starts": 0, "median_distance": 0.1},
        1.0: {"diverged_starts": 0, "median_distance": 0.1},
    }
    assert rosenbrock.choose(grid) == 1e-1


def test_quick_run_writes_files(quick, tmp_path):
    paths = harness.write(quick, str(tmp_path))
    directory = tmp_path / "rosenbrock"
    for name in ("results.json", "results.csv", "results.md", "trajectories.png", "distances.png",
                 "as_published.png"):  # fmt: skip
        assert (directory / name).stat().st_size > 0
    assert set(paths) == {"json", "csv", "md", "trajectories", "distances", "as_published"}
    written = json.loads((directory / "results.json").read_text())
    assert [r["optimizer"] for r in written["records"]] == [r["optimizer"] for r in quick.records]
    assert "| PowerSign |" in (directory / "results.md").read_text()


# ----------------------------------------------------------------------------- momentum


def _reference_paths(config):
    """The three update rules in float64 NumPy, from their formulas."""
    lr, mu, a = config.learning_rate, config.momentum, config.curvature
    paths = {}
    for name in (momentum.SGD, momentum.EMA, momentum.CORRECTED):
        x, m, path = config.start, 0.0, [config.start]
        for t in range(config.steps):
            g = a * x
            if name == momentum.SGD:
                x -= lr * g
            else:
                m = mu * m + (1 - mu) * g
                x -= lr * (m / (1 - mu ** (t + 1)) if name == momentum.CORRECTED else m)
            path.append(x)
        paths[name] = np.array(path)
    return paths


@pytest.fixture(scope="module")
def trajectories():
    return momentum.run(momentum.Config())


def test_momentum_claims_hold(trajectories):
    claims = {r["optimizer"]: r["claims"] for r in trajectories.records}
    assert claims == {
        momentum.SGD: {"never_overshoots": True},
        momentum.EMA: {"starts_slower_than_sgd": True, "overshoots_more_loosely_than_sgd": True},
        momentum.CORRECTED: {
            "tracks_sgd_at_first": True,
            "overshoots_more_loosely_than_sgd": True,
        },
    }
    assert sum("does NOT hold" in note for note in trajectories.notes) == 0


def test_momentum_numbers_match_numpy(trajectories):
    config = momentum.Config()
    reference = _reference_paths(config)
    for record in trajectories.records:
        expected = momentum.describe(reference[record["optimizer"]])
        for key in ("x_1", "x_5", "x_10", "x_50"):
            assert record[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-5), key
        for key in ("first_overshoot_step", "sign_changes"):
            assert record[key] == expected[key], key
        assert record["max_overshoot"] == pytest.approx(expected["max_overshoot"], rel=1e-4)
        assert record["final_abs_x"] == pytest.approx(expected["final_abs_x"], rel=1e-2, abs=1e-8)


def test_momentum_first_steps(trajectories):
    by = {r["optimizer"]: r for r in trajectories.records}
    assert by[momentum.SGD]["x_1"] == pytest.approx(9.0)
    assert by[momentum.EMA]["x_1"] == pytest.approx(9.9)
    assert by[momentum.CORRECTED]["x_1"] == pytest.approx(by[momentum.SGD]["x_1"], rel=1e-6)
    assert by[momentum.SGD]["first_overshoot_step"] is None


def test_momentum_writes_files(trajectories, tmp_path):
    harness.write(trajectories, str(tmp_path))
    for name in ("results.json", "results.csv", "results.md", "trajectories.png"):
        assert (tmp_path / "momentum" / name).stat().st_size > 0
    records = json.loads((tmp_path / "momentum" / "results.json").read_text())["records"]
    assert records[1]["claims"]["starts_slower_than_sgd"] is True
