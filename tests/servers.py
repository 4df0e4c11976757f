"""Real MLflow and TensorBoard servers for tests (helpers, not tests).

Every server binds to 127.0.0.1 on a free port, runs in a process group of its own and is
killed with that group when the context ends; every wait is bounded in time.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from optiscope.experiments.ui import server_environment

HOST = "127.0.0.1"


def default_sigint():
    """`preexec_fn` for a child that must act on SIGINT even where the test runner was started
    with SIGINT ignored (a background job of a shell), which children would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


START_TIMEOUT = 90.0  # seconds a server may take to answer (MLflow needs ~7 s on 2 cores)


def free_port():
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def executable(name):
    """The console script installed beside this Python (the virtualenv's bin directory)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {name!r} script beside {sys.executable}")
    return path


def http_get(url, timeout=5.0):
    """`(status, body bytes)`; status None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (OSError, ValueError):
        return None, b""


def get_json(url, timeout=10.0):
    status, body = http_get(url, timeout=timeout)
    if status != 200:
        raise AssertionError(f"GET {url} answered {status}: {body[:500]!r}")
    return json.loads(body)


def post_json(url, payload, timeout=10.0):
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise AssertionError(f"POST {url} answered {err.code}: {err.read()[:500]!r}") from None


def answers(url, timeout=2.0):
    """True if `url` answers with HTTP 200."""
    return http_get(url, timeout=timeout)[0] == 200


def wait_until(predicate, timeout, interval=0.2, what="condition"):
    """Polls `predicate` until it returns a true value (returned) or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout} s")
        time.sleep(interval)


def kill_group(process, sig=signal.SIGTERM, timeout=5.0):
    """Ends `process` and everything in its process group (`sig`, then SIGKILL)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    # Children (uvicorn / gunicorn workers) may outlive the leader: kill the whole group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)


def _start(command, log_path, ready_url, what):
    log = open(log_path, "ab")  # noqa: SIM115 - closed in the finally of the caller's context
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=server_environment(PYTHONUNBUFFERED="1"),
    )

    def ready():
        if process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with code {process.returncode}; log {log_path}:\n" + _tail(log_path)
            )
        return answers(ready_url)

    try:
        wait_until(ready, START_TIMEOUT, what=f"{what} answering {ready_url}")
    except BaseException:
        kill_group(process)
        log.close()
        raise
    return process, log


def _tail(path, size=3000):
    try:
        with open(path, "rb") as file:
            return file.read()[-size:].decode(errors="replace")
    except OSError:
        return ""


class Server:
    """A started server: `url` (no trailing slash), `port`, `process`; `stop()` kills it."""

    def __init__(self, url, port, process, log, log_path):
        self.url, self.port, self.process = url, port, process
        self._log, self.log_path = log, log_path

    def stop(self):
        kill_group(self.process)
        self._log.close()

    def __str__(self):
        return self.url


@contextlib.contextmanager
def mlflow_server_process(tmp_path, workers=1, port=None):
    """Like `mlflow_server`, but yields the `Server` (to kill it early: `server.stop()`).
    `port`: listen there (e.g. to restart a stopped server on its store). Defaults to a free
    port."""
    tmp_path = os.fspath(tmp_path)
    os.makedirs(tmp_path, exist_ok=True)
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    command = [
        executable("mlflow"),
        "server",
        "--backend-store-uri", f"sqlite:///{os.path.join(tmp_path, 'mlflow.db')}",
        "--artifacts-destination", os.path.join(tmp_path, "artifacts"),
        "--serve-artifacts",
        "--host", HOST,
        "--port", str(port),
        "--workers", str(workers),
    ]  # fmt: skip
    log_path = os.path.join(tmp_path, "mlflow-server.log")
    process, log = _start(command, log_path, f"{url}/health", "mlflow server")
    server = Server(url, port, process, log, log_path)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def mlflow_server(tmp_path):
    """A real `mlflow server` (SQLite store and served artifacts under `tmp_path`); yields
    its URL once GET /health answers 200."""
    with mlflow_server_process(tmp_path) as server:
        yield server.url


@contextlib.contextmanager
def tensorboard_server(logdir, load_fast=None):
    """A real `tensorboard` on `logdir` (reloading every second); yields its URL once
    /data/logdir answers. `load_fast=False` uses the Python loader (as `optiscope ui` does:
    the fast one serves no custom-scalar layout)."""
    logdir = os.fspath(logdir)
    port = free_port()
    url = f"http://{HOST}:{port}"
    command = [
        executable("tensorboard"),
        "--logdir", logdir,
        "--host", HOST,
        "--port", str(port),
        "--reload_interval", "1",
        *([] if load_fast is None else [f"--load_fast={str(load_fast).lower()}"]),
    ]  # fmt: skip
    log_path = os.path.join(os.path.dirname(os.path.abspath(logdir)), f"tensorboard-{port}.log")
    process, log = _start(command, log_path, f"{url}/data/logdir", "tensorboard")
    server = Server(url, port, process, log, log_path)
    try:
        yield server.url
    finally:
        server.stop()


def postgres_missing():
    """Why the PostgreSQL-backed server cannot start here (a skip reason), or None."""
    from optiscope.experiments.server import postgres_bin

    if postgres_bin() is None:
        return "PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does)"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "no PostgreSQL driver: pip install -e '.[postgres]'"
    return None


@contextlib.contextmanager
def shared_tempdir():
    """A fresh temporary directory that PostgreSQL's unprivileged user can enter (pytest's
    and mkdtemp's are private to their owner); removed afterwards."""
    import shutil
    import tempfile

    directory = tempfile.mkdtemp(prefix="optiscope-team-")
    os.chmod(directory, 0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def team_server(workers=2):
    """`optiscope server`'s set-up (PostgreSQL store, served artifacts) in a fresh
    `shared_tempdir`; yields the started `TeamServer`."""
    from optiscope.experiments.server import TeamServer

    with shared_tempdir() as directory, TeamServer(directory + "/server", workers=workers) as team:
        yield team
