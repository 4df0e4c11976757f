"""The PostgreSQL-backed tracking server under load: nothing is lost, no run stays RUNNING.

Two training processes log at the same time into two experiments; two workers of one
`MultiWorkerMirroredStrategy` run log through the chief only; the tracking server is restarted
(same port, same database) while a fit logs to it. Every metric point the logger handed to its
sinks is counted and must be on the server with its step and value.
"""

import json
import os
import subprocess
import sys
import threading

import keras
import pytest
import servers
from mlflow.tracking import MlflowClient
from test_tracking_servers import RecordingSink, fit, make_model, mlflow_points

from optiscope.callbacks import OptimizerStatsLogger
from optiscope.optimizers import InstrumentedAdam
from optiscope.tracking import MlflowSink

pytestmark = pytest.mark.slow
WORKER = os.path.join(os.path.dirname(__file__), "training_worker.py")
EPOCHS = 10  # 80 steps, read every step: ~2000 points a run


@pytest.fixture(scope="module")
def client(team_server):
    return MlflowClient(team_server.tracking_uri)


def train_in_processes(tmp_path, uri, jobs, env=None):
    """Runs one training_worker.py per (experiment, run name, extra args) at the same time;
    returns their JSON outputs."""
    processes, outputs = [], []
    for index, (experiment, run_name, extra) in enumerate(jobs):
        output = tmp_path / f"worker{index}.json"
        outputs.append(output)
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    WORKER,
                    str(output),
                    "--tracking-uri",
                    uri,
                    "--experiment",
                    experiment,
                    "--run-name",
                    run_name,
                    "--epochs",
                    str(EPOCHS),
                    *extra,
                ],  # fmt: skip
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=(env or (lambda index: None))(index),
            )
        )
    logs = []
    try:
        for process in processes:
            logs.append(process.communicate(timeout=240)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log[-3000:]
    return [json.loads(output.read_text()) for output in outputs]


def sent(result):
    return {(key, step, value) for key, step, value in result["points"]}


def test_two_processes_log_into_two_experiments_at_once(client, team_server, tmp_path):
    results = train_in_processes(
        tmp_path,
        team_server.tracking_uri,
        [("load-a", "a", []), ("load-b", "b", [])],
    )
    total = 0
    for experiment, result in zip(("load-a", "load-b"), results, strict=True):
        assert result["spool_path"] is None
        run = client.get_run(result["run_id"])
        assert run.info.status == "FINISHED"
        assert client.get_experiment(run.info.experiment_id).name == experiment
        points = sent(result)
        assert len(points) > 1500
        assert mlflow_points(client, result["run_id"]) == points
        total += len(points)
    print(f"\ntwo processes, two experiments: {total} points sent, {total} found")


def test_two_workers_of_one_run_log_through_the_chief(client, team_server, tmp_path):
    ports = [servers.free_port(), servers.free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}

    def env(index):
        task = {"type": "worker", "index": index}
        return {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": task})}

    jobs = [("multi-worker", "mw", ["--multi-worker"])] * 2
    chief, other = train_in_processes(tmp_path, team_server.tracking_uri, jobs, env)
    assert other["run_id"] is None and other["points"] == []  # the other worker wrote nothing
    experiment = client.get_experiment_by_name("multi-worker")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == chief["run_id"]
    assert run.info.status == "FINISHED"
    points = sent(chief)
    assert len(points) > 1500
    assert mlflow_points(client, chief["run_id"]) == points
    print(f"\ntwo workers, one run: {len(points)} points sent by the chief, {len(points)} found")


class RestartTrackingServer(keras.callbacks.Callback):
    """Stops the tracking server after epoch `down_at` and starts it again (same port, same
    database) in a thread meanwhile; training waits for it only after epoch `wait_at`."""

    def __init__(self, team, down_at, wait_at):
        super().__init__()
        self.team, self.down_at, self.wait_at = team, down_at, wait_at
        self.restarted = threading.Event()
        self.down_steps = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.down_at:
            self.team.tracking.stop()
            self.down_steps = int(self.model.optimizer.iterations.numpy())
            threading.Thread(target=self._start_again, daemon=True).start()
        elif epoch + 1 == self.wait_at:
            assert self.restarted.wait(timeout=servers.START_TIMEOUT)

    def _start_again(self):
        self.team.tracking.start()
        self.restarted.set()


def test_fit_survives_a_tracking_server_restart(client, team_server, tmp_path):
    sink = MlflowSink(
        tracking_uri=team_server.tracking_uri,
        experiment_name="restart",
        run_name="restarted",
        spool_dir=tmp_path,
        close_timeout=60,
    )
    recorder = RecordingSink()
    restart = RestartTrackingServer(team_server, down_at=3, wait_at=8)
    logger = OptimizerStatsLogger(sinks=[sink, recorder], interval=1, close_sinks=True)
    fit(make_model(InstrumentedAdam(learning_rate=0.01)), [logger, restart], epochs=EPOCHS)
    assert restart.restarted.is_set()
    assert sink.spool_path is None, sink.last_error
    assert sink.last_error is not None  # the sink did see the outage
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"
    points = recorder.mlflow_points()
    found = mlflow_points(client, sink.run_id)
    assert found == points
    after_outage = {
        p for p in points if p[0] == "optimizer/learning_rate" and p[1] > restart.down_steps
    }
    assert after_outage and after_outage <= found
    print(f"\nrestart mid-run: 1 restart, {len(points)} points sent, {len(found)} found")


def test_no_run_is_left_running(client):
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=5000)
    assert runs, "the premise: the tests above logged runs"
    assert [(r.info.run_name, r.info.status) for r in runs if r.info.status != "FINISHED"] == []
    print(f"\n{len(runs)} runs on the server, none left RUNNING")
