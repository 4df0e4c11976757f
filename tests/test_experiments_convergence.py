"""The 1-D convergence experiment reproduces the guide's table exactly, and the CLI writes it."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from optiscope.experiments import NAMES, convergence, harness

# The guide's table: (optimizer row, learning rate) -> (outcome, iteration)
EXPECTED = {
    ("gradient descent", 1e-3): ("not_converged", 2000),
    ("gradient descent", 1e-2): ("not_converged", 2000),
    ("gradient descent", 1e-1): ("exploded", 6),
    ("momentum 0.7", 1e-3): ("not_converged", 2000),
    ("momentum 0.7", 1e-2): ("converged", 80),
    ("momentum 0.7", 1e-1): ("exploded", 6),
    ("Adam, the guide's update order", 1e-3): ("not_converged", 2000),
    ("Adam, the guide's update order", 1e-2): ("not_converged", 2000),
    ("Adam, the guide's update order", 1e-1): ("converged", 1156),
    ("Adam, keras.optimizers.Adam", 1e-3): ("not_converged", 2000),
    ("Adam, keras.optimizers.Adam", 1e-2): ("not_converged", 2000),
    ("Adam, keras.optimizers.Adam", 1e-1): ("converged", 1093),
}


@pytest.fixture(scope="module")
def result():
    return convergence.run(convergence.Config())


def test_table_is_reproduced_exactly(result):
    got = {
        (r["optimizer"], r["learning_rate"]): (r["outcome"], r["iterations"])
        for r in result.records
    }
    assert got == EXPECTED


def test_converged_runs_end_at_the_minimum(result):
    for record in result.records:
        if record["outcome"] == "converged":
            assert record["final_x"] == pytest.approx(-9 / 8, abs=1e-3)


def test_gradient_descent_path_matches_numpy_float32():
    """The first iterations of GD at lr 0.1 against a float32 NumPy reference of the formula."""
    config = convergence.Config(learning_rates=(0.1,), max_iterations=10)
    make = convergence.optimizers(config)["gradient descent"]
    record, path = convergence.run_setting(make, 0.1, config, harness.NullSink())
    x, expected = np.float32(2.0), [np.float32(2.0)]
    with np.errstate(all="ignore"):
        for _ in range(5):
            x = np.float32(x - np.float32(0.1) * (np.float32(8) * x**3 + np.float32(9) * x**2))
            expected.append(x)
    np.testing.assert_allclose(path[:5], np.array(expected[:5], "float64"), rtol=1e-6)
    assert record["outcome"] == "exploded" and record["iterations"] == 6


def test_notes_explain_the_two_adams(result):
    text = " ".join(result.notes)
    assert "1156" in text and "1093" in text and "epsilon" in text


def test_cli_writes_results(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-m", "optiscope.experiments.cli", "run", "convergence"]
    done = subprocess.run(
        [*command, "--no-track", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((tmp_path / "convergence" / "results.json").read_text())["records"]
    assert {(r["optimizer"], r["learning_rate"]): (r["outcome"], r["iterations"])
            for r in records} == EXPECTED  # fmt: skip
    for name in ("results.csv", "results.md", "paths.png"):
        assert (tmp_path / "convergence" / name).stat().st_size > 0
    assert re.search(r"^gradient descent\s+0\.1\s+exploded\s+6\s", done.stdout, re.M), done.stdout
    assert max(map(len, done.stdout.splitlines())) <= 100  # fits a terminal


def test_cli_lists_experiments_and_rejects_bad_arguments():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    cli = [sys.executable, "-m", "optiscope.experiments.cli"]
    listed = subprocess.run([*cli, "list"], capture_output=True, text=True, timeout=120, env=env)
    assert listed.returncode == 0
    for name in NAMES:
        assert name in listed.stdout
    names = subprocess.run([*cli, "list", "--names"], capture_output=True, text=True, timeout=120)
    assert names.stdout.split() == list(NAMES)
    assert set(NAMES) == {"convergence", "rosenbrock", "momentum", "housing", "boston"}
    bad = subprocess.run(
        [*cli, "run", "nope"], capture_output=True, text=True, timeout=120, env=env
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    bad = subprocess.run(
        [*cli, "ui", "--mlflow-port", "70000"], capture_output=True, text=True, timeout=120, env=env
    )
    assert bad.returncode == 2 and "port" in bad.stderr
