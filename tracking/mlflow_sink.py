"""MLflow sink: params, metrics, tags, artifacts and nested runs, fail-soft.

Records are queued and delivered by a background thread with `log_batch` (at most 1000 metrics,
100 params and 100 tags a call), so a slow or unreachable server never stalls training. Every
record is also appended to the run's journal in the spool directory as it is produced (see
`journal.py`); the first delivery problem is warned about with the journal's path, and the
journal is removed once the server has everything. If anything is still undelivered when the
sink closes (after `close_timeout` seconds without progress), the journal stays and one more warning
names it; so does the journal of a process that is killed. `replay(path)` (or `optiscope
replay PATH`) completes the run from it.
"""

import collections
import os
import re
import tempfile
import threading
import time
import urllib.parse
import warnings

from optiscope.tracking import naming
from optiscope.tracking._checks import (
    check_bool,
    check_name,
    check_non_negative,
    check_path,
    check_positive,
)
from optiscope.tracking.base import Sink, check_status, png
from optiscope.tracking.journal import (
    DEFAULT_SPOOL_DIR,
    MAX_METRICS,
    Journal,
    deliver_records,
    experiment_id,
    next_batch,
    now_ms,
)

_SCHEMES = {"", "file", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks"}


def check_tracking_uri(uri):
    """Returns `uri` (or None); raises `ValueError` for a malformed one."""
    if uri is None:
        return None
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(
            f"Argument `tracking_uri` must be a non-empty string. Received: tracking_uri={uri!r}"
        )
    if "://" in uri and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri):
        raise ValueError(
            f"Argument `tracking_uri` is not a URI (scheme://...). Received: tracking_uri={uri!r}"
        )
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if len(scheme) == 1:  # a Windows drive letter
        scheme = ""
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise ValueError(
            "Argument `tracking_uri` names a file store, which MLflow 3 refuses unless "
            "MLFLOW_ALLOW_FILE_STORE=true; use e.g. sqlite:///path/mlflow.db or http://host:port. "
            f"Received: tracking_uri={uri!r}"
        )
    if scheme not in _SCHEMES:
        raise ValueError(
            f"Argument `tracking_uri` has an unsupported scheme {parsed.scheme!r}; use a local "
            f"path or one of {sorted(s for s in _SCHEMES if s)}. Received: tracking_uri={uri!r}"
        )
    if scheme in ("http", "https"):
        try:
            port = parsed.port
        except ValueError:
            port = -1
        if not parsed.hostname or port == -1:
            raise ValueError(
                "Argument `tracking_uri` must look like http://host:port. "
                f"Received: tracking_uri={uri!r}"
            )
    return uri


def _quiet_mlflow_retries():
    # This sink retries by itself; MLflow's own retries would hold a record for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class MlflowSink(Sink):
    """Logs to an MLflow run: the given one, the active one, or a new one.

    Args:
        tracking_uri: where to log. Defaults to None: MLflow's own default (the
            `MLFLOW_TRACKING_URI` environment variable, else MLflow's local store).
        experiment_name: the experiment of a new run. Defaults to None (MLflow's default).
        run_name: the name of a new run. Defaults to a time-stamped name.
        run_id: log into this existing run. A run that has ended is opened again (RUNNING)
            and ended by `close`, so a resumed training continues its run. Defaults to None.
        parent: a parent `MlflowSink` (or run id): the new run is nested under it.
        tags: tags of a new run.
        asynchronous: deliver from a background thread. Defaults to True.
        spool_dir: the directory of the run's journal. Defaults to "optiscope-spool".
        retry_interval: seconds between delivery attempts after a failure. Defaults to 1.
        close_timeout: seconds `close` keeps trying once delivery stops progressing, before
            leaving the rest in the journal; a request still waiting for its answer is waited
            for (MLflow's HTTP timeout bounds it: 10 s unless `MLFLOW_HTTP_REQUEST_TIMEOUT` is
            set), so a slow store loses nothing. Defaults to 10.
        flush_interval: the background thread delivers every this many seconds, or as soon
            as 1000 metrics wait, so that many small reads cost few calls. Defaults to 5.
    """

    def __init__(
        self,
        tracking_uri=None,
        experiment_name=None,
        run_name=None,
        run_id=None,
        parent=None,
        tags=None,
        asynchronous=True,
        spool_dir=DEFAULT_SPOOL_DIR,
        retry_interval=1.0,
        close_timeout=10.0,
        flush_interval=5.0,
    ):
        import mlflow

        self.tracking_uri = check_tracking_uri(tracking_uri)
        self.experiment_name = check_name("experiment_name", experiment_name)
        self.run_name = check_name("run_name", run_name) or naming.run_name()
        run_id = check_name("run_id", run_id)
        if parent is not None and not isinstance(parent, MlflowSink):
            check_name("parent", parent)
        if tags is not None and not hasattr(tags, "items"):
            raise ValueError(f"Argument `tags` must be a dict or None. Received: tags={tags!r}")
        self.asynchronous = check_bool("asynchronous", asynchronous)
        self.spool_dir = check_path("spool_dir", spool_dir)
        self.retry_interval = check_positive("retry_interval", retry_interval)
        self.close_timeout = check_non_negative("close_timeout", close_timeout)
        self.flush_interval = check_positive("flush_interval", flush_interval)
        _quiet_mlflow_retries()
        self.parent = parent
        self.tags = dict(tags or {})
        self.spool_path = None
        self.last_error = None
        self.rejected = 0
        self._params = {}
        self.start_time = now_ms()  # the run's start, whenever the server learns of it
        self._named_keys = set()  # rewritten keys whose full names were logged

        self.run_id = run_id
        self.experiment_id = None
        self._owns_run = run_id is None
        self._reopen = run_id is not None
        active = mlflow.active_run()
        if (
            run_id is None
            and active is not None
            and self.tracking_uri
            in (
                None,
                mlflow.get_tracking_uri(),
            )
        ):
            self.run_id, self._owns_run = active.info.run_id, False
        self._client = None
        self._pending = collections.deque()
        self._delivering = False  # a request is waiting for the back end's answer
        self._waiting_metrics = 0
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._warned = False
        self._worker = None
        self._journal = Journal(
            self.spool_dir,
            {
                "run_name": self.run_name,
                "experiment_name": self.experiment_name,
                "run_id": self.run_id,
                "owns_run": self._owns_run,
                "tracking_uri": self.tracking_uri or mlflow.get_tracking_uri(),
                "parent_run_name": getattr(parent, "run_name", None),
                "tags": self.tags,
            },
        )
        self.journal_path = self._journal.path

    # ------------------------------------------------------------------ public interface
    def log_params(self, params):
        """MLflow keeps one value per param: a key logged again with another value is kept
        under `<key>_2` (`_3`, ...), with a warning, instead of failing the run's batches."""
        clean = {}
        for key, value in params.items():
            key, value = self._key(key), naming.param_value(value)
            if self._params.get(key, value) != value:
                renamed = next(
                    f"{key}_{i}" for i in range(2, 10**6) if f"{key}_{i}" not in self._params
                )
                warnings.warn(
                    f"optiscope: param {key!r} of run {self.run_name!r} was logged before with "
                    f"another value; this value is kept as {renamed!r}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                key = renamed
            self._params[key] = value
            clean[key] = value
        self._enqueue({"kind": "params", "params": clean})

    def log_metrics(self, metrics, step):
        now = now_ms()
        rows = [[self._key(k), float(v), now, int(step)] for k, v in metrics.items()]
        for start in range(0, len(rows), MAX_METRICS):
            self._enqueue({"kind": "metrics", "metrics": rows[start : start + MAX_METRICS]})

    def _key(self, key):
        """`naming.mlflow_key(key)`; the first time a key is rewritten, its full name goes to
        the param `optiscope.key.<hash>`."""
        mlflow_key = naming.mlflow_key(key)
        if mlflow_key != key and key not in self._named_keys:
            self._named_keys.add(key)
            name = naming.KEY_PARAM_PREFIX + naming.key_hash(key)
            self._params[name] = naming.param_value(str(key))
            self._enqueue({"kind": "params", "params": {name: self._params[name]}})
        return mlflow_key

    def set_tags(self, tags):
        self._enqueue({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def set_experiment_tags(self, tags):
        """Tags of the run's experiment (e.g. a saved view of its runs table), delivered in
        order with the run's records."""
        self._enqueue({"kind": "experiment_tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path, artifact_path=None):
        self._enqueue(
            {"kind": "artifact", "path": os.path.abspath(path), "artifact_path": artifact_path}
        )

    def log_figure(self, name, figure, step):
        directory = tempfile.mkdtemp(prefix="optiscope-figure-")
        path = os.path.join(directory, f"{naming.mlflow_key(name).replace('/', '_')}.png")
        with open(path, "wb") as file:
            file.write(png(figure))
        self.log_artifact(path, "figures")

    def log_hparams(self, hparams, metrics):
        self.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step=1)

    def log_event(self, message, step):
        self.set_tags({"optiscope.event": message[:5000], "optiscope.event_step": step})

    def child(self, name, tags=None, nested=True, **kwargs):
        """A sink for a run nested under this one (e.g. one optimizer setting of a comparison);
        `nested=False`: a top-level run of the same experiment."""
        options = dict(
            tracking_uri=self.tracking_uri,
            experiment_name=self.experiment_name,
            asynchronous=self.asynchronous,
            spool_dir=self.spool_dir,
            retry_interval=self.retry_interval,
            close_timeout=self.close_timeout,
            flush_interval=self.flush_interval,
        )
        options.update(kwargs)
        parent = self if nested else None
        return MlflowSink(run_name=name, parent=parent, tags=tags, **options)

    def location(self):
        uri = self.tracking_uri or _default_tracking_uri()
        experiment = self.experiment_name or "Default"
        return f"MLflow {uri}, experiment {experiment!r}, run {self.run_name!r}"

    def flush(self, timeout=None):
        """Tries to deliver everything queued; returns True if nothing is left. Gives up after
        `timeout` (default `close_timeout`) seconds without progress, never during a request."""
        patience = self.close_timeout if timeout is None else timeout
        deadline = time.monotonic() + patience
        fewest = None
        while True:
            if self.asynchronous and self._worker is not None and self._worker.is_alive():
                self._wake.set()
                time.sleep(0.01)
            else:
                self._deliver_pending()
            with self._lock:
                left = len(self._pending)
            if not left:
                return True
            if fewest is not None and left < fewest:  # delivery progresses: wait on
                deadline = time.monotonic() + patience
            fewest = left if fewest is None else min(fewest, left)
            if time.monotonic() >= deadline and not self._delivering:
                return False
            if not self.asynchronous:
                time.sleep(min(self.retry_interval, max(0.0, deadline - time.monotonic())))

    def close(self, status="FINISHED"):
        check_status(status)
        if self._closed:
            return
        self._enqueue({"kind": "end", "status": status, "time": now_ms()})
        delivered = self.flush()
        self._closed = True
        self._wake.set()
        with self._lock:
            undelivered = len(self._pending)
            self._pending.clear()
            self._waiting_metrics = 0
        keep = not delivered or bool(self.rejected)
        self._journal.close(keep=keep)
        if not keep:
            return
        self.spool_path = self._journal.path
        warnings.warn(
            f"optiscope: the MLflow server could not take {undelivered + self.rejected} "
            f"record(s) of run {self.run_name!r} ({self.last_error}). The whole run is kept in "
            f"{self.spool_path}; complete it with: optiscope replay {self.spool_path}",
            RuntimeWarning,
            stacklevel=2,
        )

    # ------------------------------------------------------------------ delivery
    def _enqueue(self, record):
        if self._closed:
            warnings.warn(
                f"optiscope: MlflowSink for run {self.run_name!r} is closed; record dropped: "
                f"{record['kind']}",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        record["time"] = now_ms()
        with self._lock:
            self._journal.append(record)
            self._pending.append(record)
            self._waiting_metrics += len(record.get("metrics", ()))
            urgent = self._waiting_metrics >= MAX_METRICS or self.run_id is None
        if self.asynchronous:
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._work, name="optiscope-mlflow", daemon=True
                )
                self._worker.start()
            if urgent:
                self._wake.set()
        else:
            self._deliver_pending()

    def _work(self):
        while not self._closed:
            self._wake.wait(timeout=self.flush_interval)
            self._wake.clear()
            if not self._deliver_pending() and not self._closed:
                time.sleep(self.retry_interval)

    def _deliver_pending(self):
        """Delivers queued records in order until done or a failure; True if all went."""
        while True:
            with self._lock:
                batch = next_batch(self._pending)
            if not batch:
                return True
            self._delivering = True
            try:
                self._deliver_retrying_a_dropped_connection(batch)
            except Exception as err:  # noqa: BLE001 - any back-end failure means: retry later
                self.last_error = f"{type(err).__name__}: {err}"
                if not _rejected(err):
                    self._delivering = False
                    self._warn_once(f"could not reach the MLflow server ({self.last_error})")
                    return False
                self.rejected += len(batch)  # the server refuses these for good: kept, not retried
                warnings.warn(
                    f"optiscope: the MLflow server rejected {batch[0]['kind']} of run "
                    f"{self.run_name!r} ({self.last_error}); they stay in the journal "
                    f"{self._journal.path}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            with self._lock:
                for record in batch:
                    if self._pending:
                        self._pending.popleft()
                        self._waiting_metrics -= len(record.get("metrics", ()))
            self._delivering = False

    def _warn_once(self, problem):
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"optiscope: run {self.run_name!r} {problem}; its records are kept in "
                f"{self._journal.path} and delivery is retried",
                RuntimeWarning,
                stacklevel=2,
            )

    def _ensure_run(self):
        """The run's id, creating the run (and a parent sink's run) on first use; a given run
        that has ended is opened again."""
        from mlflow.tracking import MlflowClient

        with self._run_lock:
            if self._client is None:
                self._client = MlflowClient(self.tracking_uri)
            if self._reopen:
                if self._client.get_run(self.run_id).info.status != "RUNNING":
                    self._client.update_run(self.run_id, status="RUNNING")
                    self._owns_run = True
                    self._journal.append(
                        {"kind": "run_id", "run_id": self.run_id, "owns_run": True}
                    )
                self._reopen = False
            if self.run_id is not None:
                return self.run_id
            tags = dict(self.tags)
            if isinstance(self.parent, MlflowSink):
                tags["mlflow.parentRunId"] = self.parent._ensure_run()
            elif self.parent is not None:
                tags["mlflow.parentRunId"] = self.parent
            experiment = experiment_id(self._client, self.experiment_name)
            self.experiment_id = experiment
            run = self._client.create_run(
                experiment, start_time=self.start_time, run_name=self.run_name, tags=tags
            )
            self.run_id = run.info.run_id
            self._journal.append({"kind": "run_id", "run_id": self.run_id, "owns_run": True})
            return self.run_id

    def _deliver(self, batch):
        run_id = self._ensure_run()
        deliver_records(self._client, run_id, batch, owns_run=self._owns_run)

    def _deliver_retrying_a_dropped_connection(self, batch):
        """`_deliver`, tried once more at once when the server dropped the connection: a
        server closes idle keep-alive connections (uvicorn after 5 s), and a request sent on
        one as it closes fails although the server is up."""
        try:
            self._deliver(batch)
        except Exception as err:  # noqa: BLE001 - anything else is handled by the caller
            if _DROPPED_CONNECTION not in str(err):
                raise
            self._deliver(batch)


_DROPPED_CONNECTION = "Connection aborted"  # urllib3's ProtocolError, as MLflow reports it


def _rejected(error):
    """True for errors the server will repeat (a bad request), not outages."""
    code = getattr(error, "error_code", "")
    return code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS")


def _default_tracking_uri():
    import mlflow

    return mlflow.get_tracking_uri()
