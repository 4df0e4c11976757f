"""MLflow sink: params, metrics, tags, artifacts and nested runs, fail-soft.

Records are queued and delivered by a background thread with `log_batch` (at most 1000 metrics,
100 params and 100 tags a call), so a slow or unreachable server never stalls training. Every
record is also journaled to a temporary file; if anything is still undelivered when the sink
closes (after `close_timeout` seconds of retrying), the journal is moved to the spool directory
and one warning names it. `replay(path)` (or `optiscope replay PATH`) writes it into a tracking
server as a new run, every record included.
"""

import collections
import json
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
import warnings

from optiscope.tracking import naming
from optiscope.tracking.base import Sink, check_status

MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100
DEFAULT_SPOOL_DIR = "optiscope-spool"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""The tag by which the MLflow 3 UI opens an experiment on its training runs (not GenAI traces)."""
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
        run_id: log into this existing run. Defaults to None.
        parent: a parent `MlflowSink` (or run id): the new run is nested under it.
        tags: tags of a new run.
        asynchronous: deliver from a background thread. Defaults to True.
        spool_dir: where undelivered journals are kept. Defaults to "optiscope-spool".
        retry_interval: seconds between delivery attempts after a failure. Defaults to 1.
        close_timeout: seconds `close` keeps trying before spooling. Defaults to 10.
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
        timings = {
            "retry_interval": retry_interval,
            "close_timeout": close_timeout,
            "flush_interval": flush_interval,
        }
        for name, value in timings.items():
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"Argument `{name}` must be >= 0. Received: {name}={value!r}")
        _quiet_mlflow_retries()
        self.experiment_name = experiment_name
        self.run_name = run_name or naming.run_name()
        self.parent = parent
        self.tags = dict(tags or {})
        self.asynchronous = asynchronous
        self.spool_dir = spool_dir
        self.retry_interval = retry_interval
        self.close_timeout = close_timeout
        self.flush_interval = flush_interval
        self.spool_path = None
        self.last_error = None
        self.rejected = 0
        self._params = {}
        self.start_time = int(time.time() * 1000)  # the run's start, whenever it is created

        self.run_id = run_id
        self.experiment_id = None
        self._owns_run = run_id is None
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
        self._waiting_metrics = 0
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._worker = None
        fd, self._journal_path = tempfile.mkstemp(prefix="optiscope-journal-", suffix=".jsonl")
        self._journal = os.fdopen(fd, "w")
        self._journal_line(
            {
                "kind": "run",
                "run_name": self.run_name,
                "experiment_name": experiment_name,
                "run_id": self.run_id,
                "parent_run_name": getattr(parent, "run_name", None),
                "tags": self.tags,
                "start_time": self.start_time,
            }
        )

    # ------------------------------------------------------------------ public interface
    def log_params(self, params):
        """MLflow keeps one value per param: a key logged again with another value is kept
        under `<key>_2` (`_3`, ...), with a warning, instead of failing the run's batches."""
        clean = {}
        for key, value in params.items():
            key, value = naming.mlflow_key(key), naming.param_value(value)
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
        now = int(time.time() * 1000)
        rows = [[naming.mlflow_key(k), float(v), now, int(step)] for k, v in metrics.items()]
        for start in range(0, len(rows), MAX_METRICS):
            self._enqueue({"kind": "metrics", "metrics": rows[start : start + MAX_METRICS]})

    def set_tags(self, tags):
        self._enqueue({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path, artifact_path=None):
        self._enqueue(
            {"kind": "artifact", "path": os.path.abspath(path), "artifact_path": artifact_path}
        )

    def log_figure(self, name, figure, step):
        directory = tempfile.mkdtemp(prefix="optiscope-figure-")
        path = os.path.join(directory, f"{naming.mlflow_key(name).replace('/', '_')}.png")
        figure.savefig(path)
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
        """Tries to deliver everything queued; returns True if nothing is left."""
        deadline = time.monotonic() + (self.close_timeout if timeout is None else timeout)
        while True:
            if self.asynchronous and self._worker is not None and self._worker.is_alive():
                self._wake.set()
                time.sleep(0.01)
            else:
                self._deliver_pending()
            with self._lock:
                if not self._pending:
                    return True
            if time.monotonic() >= deadline:
                return False
            if not self.asynchronous:
                time.sleep(min(self.retry_interval, max(0.0, deadline - time.monotonic())))

    def close(self, status="FINISHED"):
        check_status(status)
        if self._closed:
            return
        self._enqueue({"kind": "end", "status": status, "time": int(time.time() * 1000)})
        delivered = self.flush()
        self._closed = True
        self._wake.set()
        with self._lock:
            self._journal.close()
            undelivered = len(self._pending)
            self._pending.clear()
            self._waiting_metrics = 0
        if delivered and not self.rejected:
            os.remove(self._journal_path)
            return
        os.makedirs(self.spool_dir, exist_ok=True)
        self.spool_path = os.path.abspath(
            os.path.join(self.spool_dir, f"{naming.mlflow_key(self.run_name)}.jsonl")
        )
        shutil.move(self._journal_path, self.spool_path)
        warnings.warn(
            f"optiscope: the MLflow server could not take {undelivered + self.rejected} "
            f"record(s) of run "
            f"{self.run_name!r} ({self.last_error}). The whole run is kept in {self.spool_path}; "
            f"replay it with: optiscope replay {self.spool_path} --tracking-uri URI",
            RuntimeWarning,
            stacklevel=2,
        )

    # ------------------------------------------------------------------ delivery
    def _journal_line(self, record):
        self._journal.write(json.dumps(record) + "\n")

    def _enqueue(self, record):
        if self._closed:
            warnings.warn(
                f"optiscope: MlflowSink for run {self.run_name!r} is closed; record dropped: "
                f"{record['kind']}",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        with self._lock:
            self._journal_line(record)
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
                batch = _next_batch(self._pending)
            if not batch:
                return True
            try:
                self._deliver(batch)
            except Exception as err:  # noqa: BLE001 - any back-end failure means: retry later
                self.last_error = f"{type(err).__name__}: {err}"
                if not _rejected(err):
                    return False
                self.rejected += len(batch)  # the server refuses these for good: kept, not retried
                warnings.warn(
                    f"optiscope: the MLflow server rejected {batch[0]['kind']} of run "
                    f"{self.run_name!r} ({self.last_error}); they stay in the spool file",
                    RuntimeWarning,
                    stacklevel=2,
                )
            with self._lock:
                for record in batch:
                    if self._pending:
                        self._pending.popleft()
                        self._waiting_metrics -= len(record.get("metrics", ()))

    def _ensure_run(self):
        """The run's id, creating the run (and a parent sink's run) on first use."""
        from mlflow.tracking import MlflowClient

        with self._run_lock:
            if self._client is None:
                self._client = MlflowClient(self.tracking_uri)
            if self.run_id is not None:
                return self.run_id
            tags = dict(self.tags)
            if isinstance(self.parent, MlflowSink):
                tags["mlflow.parentRunId"] = self.parent._ensure_run()
            elif self.parent is not None:
                tags["mlflow.parentRunId"] = self.parent
            experiment_id = _experiment_id(self._client, self.experiment_name)
            self.experiment_id = experiment_id
            run = self._client.create_run(
                experiment_id, start_time=self.start_time, run_name=self.run_name, tags=tags
            )
            self.run_id = run.info.run_id
            return self.run_id

    def _deliver(self, batch):
        run_id = self._ensure_run()
        deliver_records(self._client, run_id, batch, owns_run=self._owns_run)


def _rejected(error):
    """True for errors the server will repeat (a bad request), not outages."""
    code = getattr(error, "error_code", "")
    return code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS")


def _next_batch(pending):
    """The next records to send together: consecutive metric records up to 1000 metrics, or
    one record of another kind."""
    if not pending:
        return []
    first = pending[0]
    if first["kind"] != "metrics":
        return [first]
    batch, count = [], 0
    for record in pending:
        if record["kind"] != "metrics" or count + len(record["metrics"]) > MAX_METRICS:
            break
        batch.append(record)
        count += len(record["metrics"])
    return batch


def _default_tracking_uri():
    import mlflow

    return mlflow.get_tracking_uri()


def _experiment_id(client, name):
    if name is None:
        return "0"
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, tags=EXPERIMENT_KIND)
    for key, value in EXPERIMENT_KIND.items():
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def deliver_records(client, run_id, records, owns_run=True):
    """Sends journal records to a run with the fewest calls MLflow allows."""
    from mlflow.entities import Metric, Param, RunTag

    metrics = [
        Metric(key, value, timestamp, step)
        for record in records
        if record["kind"] == "metrics"
        for key, value, timestamp, step in record["metrics"]
    ]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    for record in records:
        kind = record["kind"]
        if kind == "params":
            items = list(record["params"].items())
            for start in range(0, len(items), MAX_PARAMS):
                chunk = items[start : start + MAX_PARAMS]
                client.log_batch(run_id, params=[Param(k, v) for k, v in chunk])
        elif kind == "tags":
            items = list(record["tags"].items())
            for start in range(0, len(items), MAX_TAGS):
                chunk = items[start : start + MAX_TAGS]
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in chunk])
        elif kind == "artifact":
            if os.path.exists(record["path"]):
                client.log_artifact(run_id, record["path"], record["artifact_path"])
            else:
                warnings.warn(
                    f"optiscope: artifact {record['path']} no longer exists; skipped",
                    RuntimeWarning,
                    stacklevel=2,
                )
        elif kind == "end" and owns_run:
            client.set_terminated(run_id, record["status"], end_time=record.get("time"))


def replay(path, tracking_uri=None, experiment_name=None):
    """Writes a spool (journal) file into a tracking server as a new run; returns its id.

    Parents are not recreated: a nested run is replayed as a top-level run tagged with its
    parent's name.
    """
    from mlflow.tracking import MlflowClient

    check_tracking_uri(tracking_uri)
    with open(path) as file:
        lines = [json.loads(line) for line in file if line.strip()]
    if not lines or lines[0].get("kind") != "run":
        raise ValueError(f"Argument `path` is not an optiscope spool file: {path!r}")
    header, records = lines[0], lines[1:]
    client = MlflowClient(check_tracking_uri(tracking_uri))
    tags = dict(header.get("tags") or {})
    if header.get("parent_run_name"):
        tags["optiscope.parent_run_name"] = header["parent_run_name"]
    tags["optiscope.replayed_from"] = os.path.abspath(path)
    experiment_id = _experiment_id(client, experiment_name or header.get("experiment_name"))
    run = client.create_run(
        experiment_id,
        start_time=header.get("start_time"),
        run_name=header.get("run_name"),
        tags=tags,
    )
    batch, count = [], 0
    for record in records:
        if record["kind"] == "metrics":
            if count + len(record["metrics"]) > MAX_METRICS:
                deliver_records(client, run.info.run_id, batch)
                batch, count = [], 0
            batch.append(record)
            count += len(record["metrics"])
            continue
        if batch:
            deliver_records(client, run.info.run_id, batch)
            batch, count = [], 0
        deliver_records(client, run.info.run_id, [record])
    if batch:
        deliver_records(client, run.info.run_id, batch)
    if not any(r["kind"] == "end" for r in records):
        client.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id
