"""The team set-up: MLflow on PostgreSQL with served artifacts, as `optiscope server` starts it.

A real PostgreSQL cluster (run as an unprivileged user, on 127.0.0.1) and a real `mlflow server
--serve-artifacts` on it; a quick experiment through the CLI and a `fit` with the logger log to
it, and everything is read back with `MlflowClient`: params, stepped metric histories, nested
runs, and artifacts downloaded through the server (`mlflow-artifacts:` URIs). `optiscope server`
itself prints the tracking URI and stops both servers on Ctrl-C.
"""

import json
import math
import os
import pathlib
import queue
import re
import signal
import subprocess
import threading
import time

import pytest
import servers
from mlflow.tracking import MlflowClient
from test_tracking_servers import (
    INTERVAL,
    LR,
    RecordingSink,
    expected_read_steps,
    fit,
    make_model,
    mlflow_points,
)

from optiscope.callbacks import OptimizerStatsLogger
from optiscope.experiments import convergence, harness
from optiscope.optimizers import InstrumentedAdam
from optiscope.tracking import MlflowSink

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(team_server):
    return MlflowClient(team_server.tracking_uri)


def listening_addresses(port):
    """The local addresses on which something listens on TCP `port` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as file:
                rows = file.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_servers_listen_on_localhost_only_and_postgres_is_unprivileged(team_server):
    loopback = {"0100007F"}  # 127.0.0.1, little-endian hex
    assert listening_addresses(team_server.database.port) == loopback
    assert listening_addresses(team_server.tracking.port) == loopback
    with open(os.path.join(team_server.database.data_dir, "postmaster.pid")) as file:
        postmaster = int(file.readline())
    with open(f"/proc/{postmaster}/status") as file:
        uid = next(int(line.split()[1]) for line in file if line.startswith("Uid:"))
    assert uid != 0
    assert os.stat(team_server.database.data_dir).st_uid == uid
    assert team_server.database.uri().startswith("postgresql")


def test_quick_experiment_reads_back(team_server, client, tmp_path):
    """`optiscope run convergence --quick --tracking-uri URI`: a parent run, one nested child
    per setting with its params and per-iteration histories, the results as artifacts."""
    result = subprocess.run(
        [
            servers.executable("optiscope"),
            "run",
            "convergence",
            "--quick",
            "--tracking-uri",
            team_server.tracking_uri,
            "--out",
            str(tmp_path / "results"),
            "--logdir",
            str(tmp_path / "runs"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optiscope-spool" not in result.stderr, result.stderr[-3000:]
    results_path = tmp_path / "results" / "convergence" / "results.json"
    records = json.loads(results_path.read_text())["records"]
    config = convergence.Config.quick()
    assert len(records) == len(convergence.optimizers(config)) * len(config.learning_rates)

    experiment = client.get_experiment_by_name(harness.mlflow_experiment("convergence"))
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("optiscope.role") == "parent"]
    settings = [r for r in runs if r.data.tags.get("optiscope.run") == parent.info.run_name]
    settings = [r for r in settings if r.info.run_id != parent.info.run_id]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optiscope.experiment"] == "convergence"
    assert int(parent.data.params["max_iterations"]) == config.max_iterations
    assert len(settings) == len(records) == len(runs) - 1
    by_setting = {
        (r.data.params["setting"], float(r.data.params["learning_rate"])): r for r in settings
    }
    for record in records:
        run = by_setting[(record["optimizer"], record["learning_rate"])]
        assert run.info.status == "FINISHED"
        x = sorted(client.get_metric_history(run.info.run_id, "x"), key=lambda m: m.step)
        steps = [m.step for m in x]
        if record["outcome"] == "exploded":  # the NaN step is not logged
            assert steps == list(range(1, record["iterations"]))
        else:
            assert steps == list(range(1, record["iterations"] + 1))
            assert x[-1].value == pytest.approx(record["final_x"], rel=1e-6)
        loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
        assert sorted(loss) == steps
        for m in [m for m in x if math.isfinite(loss[m.step])][:50]:
            assert loss[m.step] == pytest.approx(2 * m.value**4 + 3 * m.value**3 + 2, rel=1e-6)

    # One summary metric per setting on the parent (keys shortened where MLflow refuses `=`).
    summary = [v for k, v in parent.data.metrics.items() if k.startswith("summary/")]
    assert sorted(summary) == sorted(float(r["iterations"]) for r in records)

    # Artifacts go through the server into its artifact directory and come back the same.
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    listed = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert {"results/results.json", "results/results.csv", "results/results.md"} <= listed
    downloaded = client.download_artifacts(
        parent.info.run_id, "results/results.json", str(tmp_path / "down")
    )
    with open(downloaded, "rb") as file:
        assert file.read() == results_path.read_bytes()
    on_disk = [
        os.path.join(d, f) for d, _, files in os.walk(team_server.tracking.artifacts_dir)
        for f in files
    ]  # fmt: skip
    assert any(path.endswith(os.path.join("results", "results.json")) for path in on_disk)
    (figure,) = [
        a for a in client.list_artifacts(parent.info.run_id, "results") if a.path.endswith(".png")
    ]
    png = client.download_artifacts(parent.info.run_id, figure.path, str(tmp_path / "png"))
    with open(png, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_fit_with_the_logger_reads_back(team_server, client, tmp_path):
    """A fit logged by `OptimizerStatsLogger` (with a nested run and an artifact): the server
    holds exactly the points the logger sent, the params, the child and the artifact."""
    sink = MlflowSink(
        tracking_uri=team_server.tracking_uri,
        experiment_name="fit",
        run_name="adam",
        spool_dir=tmp_path,
    )
    recorder = RecordingSink()
    optimizer = InstrumentedAdam(learning_rate=LR)
    logger = OptimizerStatsLogger(
        sinks=[sink, recorder], interval=INTERVAL, params={"data": "random"}, close_sinks=True
    )
    fit(make_model(optimizer), [logger])
    assert sink.spool_path is None, sink.last_error

    child = sink.child("probe")  # a nested run, and an artifact, on the finished parent's side
    child.log_metrics({"probe/loss": 0.5}, step=3)
    notes = tmp_path / "notes.txt"
    notes.write_text("adam on random data\n")
    child.log_artifact(notes, "notes")
    child.close()
    assert child.spool_path is None, child.last_error

    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.class"] == "Adam"  # the class a user would type
    assert float(run.data.params["optimizer.learning_rate"]) == pytest.approx(LR)
    assert run.data.params["data"] == "random"
    history = client.get_metric_history(sink.run_id, "optimizer/grad_norm/hidden/kernel")
    assert sorted(m.step for m in history) == expected_read_steps()
    assert mlflow_points(client, sink.run_id) == recorder.mlflow_points()

    nested = client.get_run(child.run_id)
    assert nested.data.tags["mlflow.parentRunId"] == sink.run_id
    assert nested.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(child.run_id, "probe/loss")] == [
        (3, 0.5)
    ]
    assert nested.info.artifact_uri.startswith("mlflow-artifacts:")
    local = client.download_artifacts(child.run_id, "notes/notes.txt", str(tmp_path / "down"))
    with open(local) as file:
        assert file.read() == notes.read_text()


def test_cli_prints_the_tracking_uri_and_stops_both_on_ctrl_c():
    """`optiscope server --dir D --port P --db-port Q` serves on P, keeps its data in D, and
    Ctrl-C stops MLflow and PostgreSQL; started again on D it still has the runs."""
    reason = servers.postgres_missing()
    if reason:
        pytest.skip(reason)
    with servers.shared_tempdir() as base:
        check_cli(pathlib.Path(base) / "team")


def check_cli(directory):
    port, db_port = servers.free_port(), servers.free_port()

    def start():
        process = subprocess.Popen(
            [
                servers.executable("optiscope"),
                "server",
                "--dir",
                str(directory),
                "--port",
                str(port),
                "--db-port",
                str(db_port),
                "--workers",
                "1",
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            preexec_fn=servers.default_sigint,
        )
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in process.stdout], daemon=True).start()
        deadline, seen = time.monotonic() + servers.START_TIMEOUT + 60, []
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                assert process.poll() is None, "".join(seen)
                continue
            seen.append(line)
            match = re.search(r"--tracking-uri (http://\S+)", line)
            if match:
                return process, match.group(1)
        raise AssertionError("optiscope server printed no tracking URI:\n" + "".join(seen))

    def stop(process):
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        assert not servers.answers(f"http://127.0.0.1:{port}/health", timeout=1)
        assert listening_addresses(db_port) == set()

    process, uri = start()
    try:
        assert uri == f"http://127.0.0.1:{port}"
        assert servers.answers(f"{uri}/health")
        run = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("kept"))
        stop(process)
        assert os.path.isfile(directory / "postgres" / "PG_VERSION")

        process, uri = start()
        assert MlflowClient(uri).get_run(run.info.run_id).info.experiment_id == (
            run.info.experiment_id
        )
        stop(process)
    finally:
        if process.poll() is None:
            servers.kill_group(process, signal.SIGINT, timeout=30)
