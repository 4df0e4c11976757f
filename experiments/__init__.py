"""Reproducible optimizer comparisons: one module per experiment, each following the
`harness.Experiment` protocol (`NAME`, `DESCRIPTION`, a frozen `Config` with `quick()`, and
`run(config) -> Result`); the shared `harness` (result files, tracking, progress), `data`
loaders and the `optiscope` CLI. `NAMES` is the one list of experiments that the CLI, the
tests and CI read; `load(name)` imports one."""

import importlib

NAMES = ("convergence", "rosenbrock", "momentum", "housing", "boston")
EXPERIMENTS = {name: f"optiscope.experiments.{name}" for name in NAMES}


def load(name):
    """The experiment module called `name`."""
    if name not in EXPERIMENTS:
        raise ValueError(f"Argument `name` must be one of {NAMES}. Received: name={name!r}")
    return importlib.import_module(EXPERIMENTS[name])
