"""An experiment's runs as a person opens them: a reduced Rosenbrock comparison tracked into a
real `mlflow server` and read back through MLflow's REST API (what the MLflow UI asks for), and
its log directory served by a real `tensorboard --load_fast=false` and read through
TensorBoard's HTTP API (what the Scalars, Custom Scalars and HParams pages ask for)."""

import json
import math
import os
import re
import urllib.parse

import pytest
import servers

from optiscope.experiments import as_published, cli, harness, rosenbrock

pytestmark = pytest.mark.slow

CONFIG = rosenbrock.Config(steps=200, learning_rates=(1e-3, 1e-2), starts=2)
OPTIMIZERS = list(rosenbrock.optimizers(CONFIG))
# The post's own code, each at its chosen rate: best runs too, tagged as such.
AS_PUBLISHED = [rosenbrock.label(name, published=True) for name in rosenbrock.POST_POINTS]
BEST = OPTIMIZERS + AS_PUBLISHED
WAIT = 60.0


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The experiment run into a live MLflow server; yields what a person would open."""
    work = tmp_path_factory.mktemp("experiment")
    with servers.mlflow_server(work / "mlflow") as url:
        options = harness.Options(
            out=str(work / "results"), logdir=str(work / "runs"), tracking_uri=url, progress=False
        )
        result = harness.run_tracked(rosenbrock, CONFIG, options)
        with open(result.files["json"]) as file:
            records = {
                rosenbrock.label(r["optimizer"], r.get("variant") == "as_published"): r
                for r in json.load(file)["records"]
            }
        yield {"url": url, "result": result, "records": records, "logdir": work / "runs"}


@pytest.fixture(scope="module")
def board(tracked):
    with servers.tensorboard_server(tracked["logdir"], load_fast=False) as url:
        yield url


# --------------------------------------------------------------------------- MLflow REST
def api(tracked, path, payload=None):
    url = f"{tracked['url']}/api/2.0/mlflow/{path}"
    return servers.get_json(url) if payload is None else servers.post_json(url, payload)


def search(tracked, filter_string):
    experiment = api(tracked, "experiments/get-by-name?experiment_name=optiscope-rosenbrock")
    found = api(
        tracked,
        "runs/search",
        {
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": filter_string,
            "max_results": 1000,
        },
    )
    return found.get("runs", [])


def tags(run):
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(run):
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def metrics(run):
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def artifacts(tracked, run, path=""):
    query = urllib.parse.urlencode({"run_id": run["info"]["run_id"], "path": path})
    return {f["path"] for f in api(tracked, f"artifacts/list?{query}").get("files", [])}


def test_mlflow_experiment_opens_on_training_runs(tracked):
    experiment = api(tracked, "experiments/get-by-name?experiment_name=optiscope-rosenbrock")
    experiment_tags = {t["key"]: t["value"] for t in experiment["experiment"]["tags"]}
    assert experiment_tags["mlflow.experimentKind"] == "custom_model_development"
    assert "workflowType=machine_learning" in tracked["result"].tracker.urls["MLflow"]


def test_mlflow_url_opens_a_view_of_the_comparison(tracked):
    """The printed URL names a saved view (an experiment tag the MLflow UI reads); its filter,
    sort and columns, asked of the server as the UI asks, give the parent and the best runs,
    best first, each with every column filled."""
    url = tracked["result"].tracker.urls["MLflow"]
    key = urllib.parse.parse_qs(url.split("?", 1)[1])["viewStateShareKey"][0]
    experiment = api(tracked, "experiments/get-by-name?experiment_name=optiscope-rosenbrock")
    experiment_tags = {t["key"]: t["value"] for t in experiment["experiment"]["tags"]}
    view = json.loads(experiment_tags[f"mlflow.sharedViewState.{key}"])
    found = api(
        tracked,
        "runs/search",
        {
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": view["searchFilter"],
            "order_by": [f"{view['orderByKey']} {'ASC' if view['orderByAsc'] else 'DESC'}"],
            "max_results": 1000,
        },
    )["runs"]
    roles = sorted(tags(r)["optiscope.role"] for r in found)
    assert roles == sorted(["parent"] + ["best"] * len(BEST))
    best = [r for r in found if tags(r)["optiscope.role"] == "best"]
    medians = [
        float(tracked["records"][tags(r)["optiscope.setting"]]["median_distance"]) for r in best
    ]
    finite = [m for m in medians if math.isfinite(m)]
    assert medians[: len(finite)] == sorted(finite), medians  # best first, as in results.json
    assert view["orderByKey"] == "metrics.`final/median_distance`"
    for run in best:
        values = {**{f"metrics.`{k}`": v for k, v in metrics(run).items()},
                  **{f"params.`{k}`": v for k, v in params(run).items()}}  # fmt: skip
        assert set(view["selectedColumns"]) <= set(values)


def test_mlflow_best_runs_are_top_level_and_tagged(tracked):
    best = search(tracked, "tags.`optiscope.role` = 'best'")
    assert sorted(tags(r)["optiscope.setting"] for r in best) == sorted(BEST)
    published = [r for r in best if tags(r).get("optiscope.variant") == "as_published"]
    assert sorted(tags(r)["optiscope.setting"] for r in published) == sorted(AS_PUBLISHED)
    for run in best:
        run_tags = tags(run)
        assert run_tags["optiscope.chosen"] == "true"
        assert "mlflow.parentRunId" not in run_tags  # on the experiment page without expanding
        assert run["info"]["status"] == "FINISHED"
        record = tracked["records"][run_tags["optiscope.setting"]]
        assert float(params(run)["learning_rate"]) == pytest.approx(record["learning_rate"])


def test_mlflow_children_carry_the_optimizer_config(tracked):
    classes = {
        "SGD": "SGD",
        "SGD momentum 0.9": "SGD",
        "EMAMomentum": "EMAMomentum",
        "PowerSign": "PowerSign",
        "RMSprop": "RMSprop",
        "Adam": "Adam",
    }
    best = {
        tags(r)["optiscope.setting"]: r for r in search(tracked, "tags.`optiscope.role` = 'best'")
    }
    for setting, name in classes.items():
        logged = params(best[setting])
        assert logged["optimizer.class"] == name, setting
        lr = tracked["records"][setting]["learning_rate"]
        assert float(logged["optimizer.learning_rate"]) == pytest.approx(lr), setting
    assert params(best["SGD momentum 0.9"])["optimizer.momentum"] == "0.9"
    assert params(best["SGD"])["optimizer.momentum"] == "0.0"
    assert {"optimizer.beta_1", "optimizer.beta_2", "optimizer.epsilon"} <= set(
        params(best["Adam"])
    )
    assert "optimizer.momentum" not in params(best["Adam"])


def test_mlflow_children_have_plots_curves_and_real_times(tracked):
    for run in search(tracked, "tags.`optiscope.role` = 'best'"):
        assert "figures/curves.png" in artifacts(tracked, run, "figures"), tags(run)
        assert "distance/fixed_start" in metrics(run)
        assert "optimizer/grad_norm/xy" in metrics(run)
        info = run["info"]
        assert int(info["end_time"]) > int(info["start_time"])


def test_mlflow_statistics_an_optimizer_lacks_are_left_out(tracked):
    best = {
        tags(r)["optiscope.setting"]: r for r in search(tracked, "tags.`optiscope.role` = 'best'")
    }
    # SignAveraging measures sign_flip_fraction; SGD measures no sign statistic at all
    assert "optimizer/sign_flip_fraction/xy" in metrics(best["SignAveraging"])
    assert not any(k.startswith("optimizer/sign_") for k in metrics(best["SGD"]))


def test_mlflow_grid_runs_are_nested_under_the_parent(tracked):
    (parent,) = search(tracked, "tags.`optiscope.role` = 'parent'")
    grid = search(tracked, "tags.`optiscope.role` = 'grid'")
    assert len(grid) == len(OPTIMIZERS) * len(CONFIG.learning_rates)
    for run in grid:
        assert tags(run)["mlflow.parentRunId"] == parent["info"]["run_id"]
        assert "optiscope.chosen" not in tags(run)


def test_mlflow_parent_has_protocol_summary_and_results_once(tracked):
    (parent,) = search(tracked, "tags.`optiscope.role` = 'parent'")
    logged = params(parent)
    assert logged["steps"] == str(CONFIG.steps)
    assert logged["starts"] == str(CONFIG.starts)
    assert json.loads(logged["learning_rates"]) == list(CONFIG.learning_rates)
    summary = metrics(parent)
    for setting, record in tracked["records"].items():
        key = f"summary/{harness.setting_name(setting)}/median_distance"
        expected = float(record["median_distance"])  # "nan" where every start diverged
        assert float(summary[key]) == pytest.approx(expected, rel=1e-6, nan_ok=True), key
    files = artifacts(tracked, parent, "results")
    assert {"results/results.md", "results/results.json", "results/trajectories.png"} <= files
    assert not artifacts(tracked, parent, "figures")  # plots kept once, with the results


# --------------------------------------------------------------------------- TensorBoard HTTP
def poll(url, path, check, payload=None):
    last = {}

    def ready():
        if payload is None:
            last["value"] = servers.get_json(url + path)
        else:
            last["value"] = servers.post_json(url + path, payload)
        return check(last["value"])

    try:
        servers.wait_until(ready, WAIT, interval=0.5, what=f"TensorBoard {path}")
    except TimeoutError:
        pytest.fail(f"TensorBoard {path} never satisfied the check; last answer: {last}")
    return last["value"]


def run_root(tracked):
    return f"rosenbrock/{tracked['result'].tracker.name}"


def test_tensorboard_runs_are_best_grid_and_summary(tracked, board):
    root = run_root(tracked)
    expected = {f"{root}/best/{harness.setting_name(name)}" for name in BEST}
    runs = poll(board, "/data/runs", lambda r: expected <= set(r))
    assert f"{root}/summary" in runs
    grid = [r for r in runs if r.startswith(f"{root}/grid/")]
    assert len(grid) == len(OPTIMIZERS) * len(CONFIG.learning_rates)
    columns = "."  # the log directory's root holds the HParams columns
    assert set(runs) == expected | set(grid) | {f"{root}/summary", columns}


def test_tensorboard_grid_names_sort_in_numeric_order():
    rates = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
    names = [harness.lr_name(lr) for lr in rates]
    assert names[0] == "lr=0.00001" and names[-1] == "lr=1"
    assert sorted(names) == names
    assert [float(n.removeprefix("lr=")) for n in names] == rates


def test_printed_tensorboard_link_selects_the_tuned_runs(tracked, board):
    root = run_root(tracked)
    expected = {f"{root}/best/{harness.setting_name(name)}" for name in BEST}
    runs = poll(board, "/data/runs", lambda r: expected <= set(r))
    tracker = tracked["result"].tracker
    for dashboard in ("scalars", "custom_scalars"):
        url = cli._tuned_runs_url(tracker.tensorboard_dir, str(tracked["logdir"]), dashboard)
        fragment = urllib.parse.urlsplit(url).fragment
        assert fragment.startswith(dashboard + "&")
        (pattern,) = urllib.parse.parse_qs(fragment)["regexInput"]
        selected = {run for run in runs if re.search(pattern, run)}
        assert selected == {run for run in runs if run.startswith(f"{root}/best/")}
        assert len(selected) <= 40  # TensorBoard selects what the filter matches up to 40 runs


def test_tensorboard_custom_scalar_layout(tracked, board):
    layout = poll(
        board,
        "/data/plugin/custom_scalars/layout",
        lambda j: {"optimizer", "rosenbrock"} <= {c["title"] for c in j.get("category", [])},
    )
    # the experiment's comparison opens first, the optimizer statistics after it
    assert [c["title"] for c in layout["category"]] == ["rosenbrock", "optimizer"]
    categories = {c["title"]: {ch["title"]: ch for ch in c["chart"]} for c in layout["category"]}
    distance = categories["rosenbrock"]["distance"]["multiline"]["tag"]
    assert any(re.search(p, "distance/fixed_start") for p in distance)
    assert any(re.search(p, "distance/median_random_starts") for p in distance)
    grad_norm = categories["optimizer"]["grad_norm"]["multiline"]["tag"]
    assert any(re.search(p, "optimizer/grad_norm/xy") for p in grad_norm)
    # the charted tags exist in the best runs (the chart is not "Matches (0)")
    tags = poll(board, "/data/plugin/scalars/tags", lambda t: run_root(tracked) in "".join(t))
    best = f"{run_root(tracked)}/best/Adam"
    assert "distance/fixed_start" in tags[best]
    assert "optimizer/grad_norm/xy" in tags[best]


def test_tensorboard_hparams_of_the_experiment(tracked, board):
    experiment = poll(
        board,
        "/data/plugin/hparams/experiment",
        lambda j: j.get("metricInfos"),
        payload={"experimentName": "", "includeMetrics": True},
    )
    names = {info["name"] for info in experiment["hparamInfos"]}
    assert {"optimizer", "setting", "learning_rate"} <= names
    metric_tags = {info["name"]["tag"] for info in experiment["metricInfos"]}
    assert {"hparams/median_distance", "hparams/final_distance"} <= metric_tags
    groups = servers.post_json(
        board + "/data/plugin/hparams/session_groups",
        {
            "experimentName": "",
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"],
            "colParams": [],
            "startIndex": 0,
            "sliceSize": 1000,
            "includeMetrics": True,
        },
    )
    optimizers = {g["hparams"]["optimizer"] for g in groups["sessionGroups"]}
    # one name each: the class a user would type (the post's own code has classes of its own)
    assert optimizers == {
        "SGD", "EMAMomentum", "SignAveraging", "PowerSign", "AddSign", "RMSprop", "Adam",
        *(cls.__name__ for cls in as_published.ROSENBROCK.values()),
    }  # fmt: skip
    settings = {g["hparams"]["setting"] for g in groups["sessionGroups"]}
    assert set(OPTIMIZERS) <= settings


def test_console_files_and_paths_exist(tracked):
    tracker = tracked["result"].tracker
    assert os.path.isdir(tracker.tensorboard_dir)
    assert os.path.isfile(
        os.path.join(os.path.dirname(tracked["result"].files["json"]), "results.md")
    )
