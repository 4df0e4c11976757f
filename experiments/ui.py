"""`optiscope ui`: TensorBoard and the MLflow UI side by side, bound to 127.0.0.1."""

import os
import shutil
import signal
import subprocess
import sys
import time

HOST = "127.0.0.1"
# MLflow's server starts a job runner (GenAI jobs: about nine more processes, each importing
# MLflow) unless told not to; optiscope runs none, so it is off unless the user turns it on.
MLFLOW_SERVER_ENVIRONMENT = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_environment(**extra):
    """The environment for a server process: this one's, with `MLFLOW_SERVER_ENVIRONMENT`
    where the user has not set those variables, and `extra`."""
    return {**MLFLOW_SERVER_ENVIRONMENT, **os.environ, **extra}


def _executable(name):
    """The console script installed beside this Python, else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.exists(local) else shutil.which(name) or name


def commands(logdir, tracking_uri, tensorboard_port, mlflow_port):
    store = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    tensorboard = [
        _executable("tensorboard"),
        "--logdir", logdir, "--host", HOST, "--port", str(tensorboard_port),
        "--load_fast=false",  # the fast loader serves no custom-scalar layout
    ]  # fmt: skip
    mlflow = [
        _executable("mlflow"), "server",
        "--backend-store-uri", store, "--host", HOST, "--port", str(mlflow_port),
    ]  # fmt: skip
    return {"TensorBoard": tensorboard, "MLflow UI": mlflow}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(logdir, tracking_uri, tensorboard_port, mlflow_port):
    """Starts both, prints their URLs, waits; Ctrl-C (or either one exiting) stops both."""
    if not os.path.isdir(logdir):
        print(f"optiscope ui: log directory {logdir!r} does not exist yet; TensorBoard will "
              "show it once a run writes there.")  # fmt: skip
    processes = {}
    ports = {"TensorBoard": tensorboard_port, "MLflow UI": mlflow_port}
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops both servers too
    try:
        for name, command in commands(logdir, tracking_uri, tensorboard_port, mlflow_port).items():
            processes[name] = subprocess.Popen(
                command, start_new_session=True, env=server_environment()
            )
            print(f"{name}: http://{HOST}:{ports[name]}/")
        print("Ctrl-C stops both.")
        while all(p.poll() is None for p in processes.values()):
            time.sleep(0.5)
        failed = [name for name, p in processes.items() if p.poll() not in (None, 0)]
        for name in failed:
            print(f"optiscope ui: {name} exited with code {processes[name].returncode}")
        return 1 if failed else 0
    except KeyboardInterrupt:
        return 0
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
