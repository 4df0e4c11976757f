"""Regenerates the README's screenshots from a real run, as a person sees it.

Runs `optiscope run rosenbrock` and `optiscope demo` (what `make run` and the README's demo do)
in a temporary directory, starts TensorBoard and the MLflow UI exactly as `optiscope ui` does
(on free ports), and captures each page with Debian's headless Chromium driven by Selenium
(`/usr/bin/chromium` and `/usr/bin/chromedriver`, the `chromium` and `chromium-driver`
packages; `pip install -e ".[docs]"` for Selenium; nothing is downloaded). Where MLflow opens
its Assistant panel on a first visit, the panel is closed, as a person does once. The PNGs go
to `docs/`.

    .venv/bin/python docs/screenshots.py [--out docs] [--work DIR] [--skip-runs]

`--work DIR` keeps the runs in DIR (and `--skip-runs` reuses them). Which runs and pages are
shown is set in one place: `TENSORBOARD_RUNS`, `MLFLOW_EXPERIMENTS` and `pages()` below.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import servers  # noqa: E402  (free ports, waiting, process groups)

from optiscope.experiments import harness, ui  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDTH, HEIGHT = 1600, 1000
SETTLE = 10  # seconds a page gets to load its data before the capture
# Regular expressions on TensorBoard run names: the runs each dashboard opens with. TensorBoard
# enables every run that matches when at most 40 do.
TENSORBOARD_RUNS = {
    "scalars": r"^rosenbrock/.*/best/",
    "demo": r"^demo/",
}
# MLflow experiments (by name) of the experiment runs and of the demo.
MLFLOW_EXPERIMENTS = {"experiment": ("optiscope-rosenbrock",), "demo": ("optiscope-demo",)}
WORKFLOW = "workflowType=machine_learning"  # MLflow 3.x: open on training runs, not traces


def pages(tensorboard, mlflow, client):
    """`{file name: URL}` of every screenshot."""
    scalars = urllib.parse.quote(TENSORBOARD_RUNS["scalars"])
    demo = urllib.parse.quote(TENSORBOARD_RUNS["demo"])
    experiment = _experiment(client, MLFLOW_EXPERIMENTS["experiment"])
    demo_experiment = _experiment(client, MLFLOW_EXPERIMENTS["demo"])
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parent = next(r for r in runs if r.data.tags.get("optiscope.role") == "parent")
    child = next(r for r in runs if r.data.tags.get("optiscope.chosen") == "true")
    compared = [r.info.run_id for r in client.search_runs([demo_experiment.experiment_id])]
    compare = urllib.parse.urlencode(
        {"runs": json.dumps(compared), "experiments": json.dumps([demo_experiment.experiment_id])}
    )
    return {
        "tensorboard-experiment-scalars.png": f"{tensorboard}/#scalars&regexInput={scalars}",
        "tensorboard-experiment-custom-scalars.png": (
            f"{tensorboard}/#custom_scalars&regexInput={scalars}"
        ),
        "tensorboard-custom-scalars.png": f"{tensorboard}/#custom_scalars&regexInput={demo}",
        "tensorboard-hparams.png": f"{tensorboard}/#hparams",
        "tensorboard-histograms.png": f"{tensorboard}/#histograms&regexInput={demo}",
        "tensorboard-images.png": f"{tensorboard}/#images&tagFilter=heatmap&regexInput={demo}",
        "mlflow-experiment.png": harness.mlflow_runs_url(mlflow, experiment.experiment_id),
        "mlflow-parent-run.png": _run_url(mlflow, parent),
        "mlflow-child-run.png": _run_url(mlflow, child),
        "mlflow-compare.png": f"{mlflow}/#/compare-runs?{compare}&{WORKFLOW}",
    }


def _experiment(client, names):
    for name in names:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment
    raise SystemExit(f"screenshots: no MLflow experiment named any of {names}")


def _run_url(mlflow, run):
    return f"{mlflow}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?{WORKFLOW}"


def run_jobs(work):
    """`optiscope run rosenbrock` and `optiscope demo` in `work`, tracked into its mlflow.db."""
    optiscope = servers.executable("optiscope")
    for command in ([optiscope, "run", "rosenbrock"], [optiscope, "demo"]):
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=work, env=_environment(work), check=True)


def _environment(work):
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{os.path.join(work, 'mlflow.db')}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }


def browser():
    """Headless Chromium with a viewport of WIDTH x HEIGHT, kept off the network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
    )
    return driver


def capture(driver, url, path):
    """One page as a PNG (a fresh load: TensorBoard reads its URL's hash only when it starts)."""
    from selenium.webdriver.common.by import By

    driver.get("about:blank")
    driver.get(url)
    time.sleep(SETTLE)
    close = '[data-component-id="mlflow.assistant.chat_panel.close"]'
    for button in driver.find_elements(By.CSS_SELECTOR, close):
        driver.execute_script("arguments[0].click()", button)
        time.sleep(1)
    driver.save_screenshot(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=HERE, help="where the PNGs go (default docs/)")
    parser.add_argument("--work", default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--skip-runs", action="store_true", help="reuse the runs in --work")
    args = parser.parse_args(argv)
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.path.exists(path):
            raise SystemExit(f"screenshots: {path} is missing (Debian: apt install {package})")
    with tempfile.TemporaryDirectory(prefix="optiscope-screenshots-") as scratch:
        work = os.path.abspath(args.work or scratch)
        os.makedirs(work, exist_ok=True)
        if not args.skip_runs:
            run_jobs(work)
        take_screenshots(work, os.path.abspath(args.out))
    return 0


def take_screenshots(work, out):
    from mlflow.tracking import MlflowClient

    ports = {"TensorBoard": servers.free_port(), "MLflow UI": servers.free_port()}
    commands = ui.commands(
        os.path.join(work, "runs"), _environment(work)["MLFLOW_TRACKING_URI"], *ports.values()
    )
    urls = {name: f"http://{ui.HOST}:{port}" for name, port in ports.items()}
    ready = {"TensorBoard": "/data/logdir", "MLflow UI": "/health"}
    processes = []
    try:
        for name, command in commands.items():
            log = open(os.path.join(work, f"{name.split()[0].lower()}.log"), "wb")  # noqa: SIM115
            processes.append(
                subprocess.Popen(
                    command, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
            servers.wait_until(
                lambda n=name: servers.answers(urls[n] + ready[n]), 120, what=f"{name} up"
            )
        time.sleep(5)  # TensorBoard's first load of the log directory
        client = MlflowClient(urls["MLflow UI"])
        driver = browser()
        try:
            for name, url in pages(urls["TensorBoard"], urls["MLflow UI"], client).items():
                print(f"{name}: {url}", flush=True)
                capture(driver, url, os.path.join(out, name))
        finally:
            driver.quit()
    finally:
        for process in processes:
            servers.kill_group(process)


if __name__ == "__main__":
    sys.exit(main())
