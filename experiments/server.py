"""`optiscope server`: a team's MLflow tracking server on this machine.

PostgreSQL (Debian's `postgresql` package) keeps runs in a cluster under `<dir>/postgres`, run
as an unprivileged user (`postgres`, else `nobody`, when started as root) and bound to
127.0.0.1 with password authentication; `mlflow server --serve-artifacts` uses it as backend
store, keeps artifacts under `<dir>/artifacts` and serves them. Logs go to `<dir>/logs/`.
Starting again on the same directory reuses the cluster, its database and its artifacts.
"""

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from optiscope.experiments.ui import HOST, _executable, _interrupt, server_environment

DATABASE = "mlflow"
DB_USER = "optiscope"
START_TIMEOUT = 120.0  # seconds; MLflow creates its tables on the first start (~20 s on 2 cores)


def free_port():
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def postgres_bin():
    """The directory of PostgreSQL's `initdb` and `postgres`; None when not installed."""
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(found)
    versions = glob.glob("/usr/lib/postgresql/*/bin/initdb")  # Debian keeps them off PATH
    if not versions:
        return None
    return os.path.dirname(max(versions, key=_major_version))


def _major_version(initdb_path):
    """15 for /usr/lib/postgresql/15/bin/initdb."""
    name = initdb_path.split("/")[-3]
    return int(name) if name.isdigit() else 0


def _check_port(name, value):
    if value is None:
        return free_port()
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"Argument `{name}` must be a port number (1-65535). Received: {value!r}")
    return value


def _wait(ready, process, what, log_path, timeout=START_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with code {process.returncode}; see {log_path}:\n{_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer within {timeout:.0f} s; see {log_path}")
        time.sleep(0.2)


def _tail(path, size=2000):
    try:
        with open(path, "rb") as file:
            return file.read()[-size:].decode(errors="replace")
    except OSError:
        return ""


def _end(process, sig, timeout):
    """Sends `sig` to `process`'s group, waits, then kills the group."""
    if process is None:
        return
    for signum in (sig, signal.SIGKILL):
        if process.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    # uvicorn workers may outlive the leader
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


class PostgresCluster:
    """A PostgreSQL cluster in `data_dir`, on 127.0.0.1:`port`, with one database for MLflow.

    When this process runs as root, the cluster belongs to and runs as `service_user` (default
    `postgres`, else `nobody`): PostgreSQL refuses to run as root.
    """

    def __init__(self, directory, port=None, service_user=None):
        self.directory = os.path.abspath(directory)
        self.data_dir = os.path.join(self.directory, "postgres")
        self.log_path = os.path.join(self.directory, "logs", "postgres.log")
        self.port = _check_port("db_port", port)
        self.bin = postgres_bin()
        if self.bin is None:
            raise RuntimeError(
                "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); "
                "install it with: apt-get install postgresql"
            )
        self.user = None
        if os.geteuid() == 0:
            self.user = service_user or _first_user("postgres", "nobody")
        self.process = None
        self._log = None

    @property
    def password(self):
        with open(os.path.join(self.directory, "postgres-password")) as file:
            return file.read().strip()

    def uri(self, database=DATABASE):
        return f"postgresql+psycopg2://{DB_USER}:{self.password}@{HOST}:{self.port}/{database}"

    def _run_as(self):
        if self.user is None:
            return {}
        entry = pwd.getpwnam(self.user)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _initialise(self):
        """`initdb` with a generated password for `DB_USER`, when `data_dir` holds no cluster."""
        if os.path.exists(os.path.join(self.data_dir, "PG_VERSION")):
            return
        password_path = os.path.join(self.directory, "postgres-password")
        with open(os.open(password_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(secrets.token_urlsafe(24))
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        owner = self._run_as()
        if owner:
            _check_reachable(self.data_dir, self.user)
            os.chown(self.data_dir, owner["user"], owner["group"])
        # initdb reads the password from a file its user can read; removed right after
        pwfile = os.path.join(self.directory, "initdb-password")
        shutil.copyfile(password_path, pwfile)
        if owner:
            os.chown(pwfile, owner["user"], owner["group"])
        try:
            result = subprocess.run(
                [
                    os.path.join(self.bin, "initdb"),
                    "--pgdata",
                    self.data_dir,
                    "--username",
                    DB_USER,
                    "--pwfile",
                    pwfile,
                    "--auth-host",
                    "scram-sha-256",
                    "--auth-local",
                    "peer",
                    "--encoding",
                    "UTF8",
                    "--no-instructions",
                ],  # fmt: skip
                capture_output=True,
                text=True,
                timeout=120,
                **owner,
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(pwfile)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")

    def start(self):
        """Initialises the cluster if needed, starts it, creates MLflow's database if missing."""
        _driver()
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self._initialise()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                os.path.join(self.bin, "postgres"),
                "-D",
                self.data_dir,
                "-p",
                str(self.port),
                "-c",
                f"listen_addresses={HOST}",
                "-c",
                "unix_socket_directories=",  # TCP on 127.0.0.1 only
            ],  # fmt: skip
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **self._run_as(),
        )
        try:
            _wait(self._accepts, self.process, "PostgreSQL", self.log_path)
            self._create_database()
        except BaseException:
            self.stop()
            raise
        return self

    def _connect(self, database):
        import psycopg2

        return psycopg2.connect(
            host=HOST,
            port=self.port,
            user=DB_USER,
            password=self.password,
            dbname=database,
            connect_timeout=5,
        )

    def _accepts(self):
        import psycopg2

        try:
            self._connect("postgres").close()
            return True
        except psycopg2.OperationalError:
            return False

    def _create_database(self):
        connection = self._connect("postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cursor.fetchone() is None:
                    cursor.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            connection.close()

    def stop(self):
        """Fast shutdown (SIGINT: open sessions are ended, everything committed is kept)."""
        _end(self.process, signal.SIGINT, timeout=30)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None


class TrackingServer:
    """`mlflow server` on 127.0.0.1:`port` with a backend store and served artifacts."""

    def __init__(self, backend_store_uri, artifacts_dir, log_path, port=None, workers=1):
        self.backend_store_uri = backend_store_uri
        self.artifacts_dir = os.path.abspath(artifacts_dir)
        self.log_path = log_path
        self.port = _check_port("port", port)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(
                f"Argument `workers` must be a positive integer. Received: {workers!r}"
            )
        self.workers = workers
        self.process = None
        self._log = None

    @property
    def url(self):
        return f"http://{HOST}:{self.port}"

    def start(self):
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        os.makedirs(self.artifacts_dir, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        command = [
            _executable("mlflow"), "server",
            "--serve-artifacts", "--artifacts-destination", self.artifacts_dir,
            "--host", HOST, "--port", str(self.port), "--workers", str(self.workers),
        ]  # fmt: skip
        # the store URI (with the database password) goes by environment, not in `ps`
        env = server_environment(MLFLOW_BACKEND_STORE_URI=self.backend_store_uri)
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        try:
            _wait(self._healthy, self.process, "mlflow server", self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self):
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self):
        _end(self.process, signal.SIGTERM, timeout=10)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None


class TeamServer:
    """PostgreSQL plus `mlflow server` under `directory`; `tracking_uri` is what clients use.

    Use as a context manager, or `start()` / `stop()`; `tracking.stop()` and
    `tracking.start()` restart the tracking server alone (same port, same database).
    """

    def __init__(self, directory="optiscope-server", port=None, db_port=None, workers=2):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.database = PostgresCluster(self.directory, port=db_port)
        self.tracking = None
        self._port, self._workers = port, workers

    @property
    def tracking_uri(self):
        return self.tracking.url

    def start(self):
        self.database.start()
        try:
            self.tracking = TrackingServer(
                self.database.uri(),
                os.path.join(self.directory, "artifacts"),
                os.path.join(self.directory, "logs", "mlflow.log"),
                port=self._port,
                workers=self._workers,
            )
            self.tracking.start()
        except BaseException:
            self.database.stop()
            raise
        return self

    def running(self):
        processes = [self.database.process, self.tracking and self.tracking.process]
        return all(p is not None and p.poll() is None for p in processes)

    def stop(self):
        if self.tracking is not None:
            self.tracking.stop()
        self.database.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def serve(directory, port=None, db_port=None, workers=2):
    """`optiscope server`: starts both, prints the tracking URI, runs until Ctrl-C or SIGTERM."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        team = TeamServer(directory, port=port, db_port=db_port, workers=workers)
    except RuntimeError as err:
        print(f"optiscope server: {err}", file=sys.stderr)
        return 2
    try:
        team.start()
        print(f"MLflow tracking server: {team.tracking_uri}/", flush=True)
        print(f"  PostgreSQL on {HOST}:{team.database.port}, database {DATABASE!r}")
        print(f"  runs in {team.database.data_dir}, artifacts in {team.tracking.artifacts_dir}")
        print(f"  logs in {os.path.dirname(team.tracking.log_path)}/")
        print(f"Log to it with:  --tracking-uri {team.tracking_uri}")
        print(f"  (or MLFLOW_TRACKING_URI={team.tracking_uri}). Ctrl-C stops both.", flush=True)
        while team.running():
            time.sleep(0.5)
        print("optiscope server: a server exited; see the logs", flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as err:
        print(f"optiscope server: {err}", file=sys.stderr)
        return 2
    finally:
        team.stop()


def _driver():
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "MLflow needs a PostgreSQL driver: pip install 'optiscope[postgres]' (psycopg2-binary)"
        ) from None


def _first_user(*names):
    for name in names:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError(f"running as root, but none of the users {names} exists to run PostgreSQL")


def _check_reachable(path, user):
    """Raises unless `user` may enter every directory above `path` (PostgreSQL runs as it)."""
    entry = pwd.getpwnam(user)
    groups = set(os.getgrouplist(user, entry.pw_gid))
    parent = os.path.dirname(path)
    while True:
        st = os.stat(parent)
        if st.st_uid == entry.pw_uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid in groups:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            raise RuntimeError(
                f"PostgreSQL runs as user {user!r}, which cannot enter {parent}; choose a --dir it "
                f"can reach (e.g. under /srv or /var/tmp) or allow it: chmod o+x {parent}"
            )
        if parent == os.path.dirname(parent):
            return
        parent = os.path.dirname(parent)
