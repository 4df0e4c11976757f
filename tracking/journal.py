"""Journals: every record of an MLflow run, appended to a file in the spool directory as it is
produced, so that neither an outage nor a killed process loses anything.

A journal's first line describes the run: its name, experiment, tracking URI, the id of the
run once known (a later `run_id` line where the run is created after the journal), and the
pid and host of the process that writes it. Every other line is one record, with the time it
was produced. The sink removes its journal once the server has every record. `pending` finds
the journals of processes that died; `replay` delivers a journal: into the original run where
the server still has it (only the points it lacks, so nothing is stored twice), else into a
new run; and ends the run with its logged status (KILLED for a process that died) and the
time of its last record.
"""

import collections
import contextlib
import glob
import json
import os
import re
import socket
import tempfile
import threading
import time
import warnings

from optiscope.tracking._checks import writable_directory

MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100
DEFAULT_SPOOL_DIR = "optiscope-spool"
SUFFIX = ".jsonl"
STALE_SECONDS = 3600  # a journal of another host untouched this long counts as abandoned
_JOURNAL_ONLY = ("run", "run_id", "replayed")  # lines that describe the journal, not the run
_REPLAYED_MARK = b'{"kind": "replayed"'  # how the line `replay` appends begins


def now_ms():
    return int(time.time() * 1000)


class Journal:
    """An append-only journal file in `spool_dir`; each line is flushed as it is written."""

    def __init__(self, spool_dir, header):
        # Only a directory this journal created is removed with it: others may be shared.
        self._made_dir = not os.path.isdir(spool_dir)
        writable_directory("spool_dir", spool_dir)
        prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", str(header.get("run_name") or "run"))[:100]
        try:
            fd, path = tempfile.mkstemp(dir=spool_dir, prefix=f"{prefix}-", suffix=SUFFIX)
        except FileNotFoundError:  # another process just removed the emptied directory
            writable_directory("spool_dir", spool_dir)
            fd, path = tempfile.mkstemp(dir=spool_dir, prefix=f"{prefix}-", suffix=SUFFIX)
        self.path = os.path.abspath(path)
        self._file = os.fdopen(fd, "w")
        self._lock = threading.Lock()
        self.append(
            {
                "kind": "run",
                "time": now_ms(),
                "pid": os.getpid(),
                "host": socket.gethostname(),
                **header,
            }
        )

    def append(self, record):
        with self._lock:
            if not self._file.closed:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()  # in the OS' hands: survives the death of this process

    def close(self, keep):
        """Closes the file; removes it (and the spool directory it created, once empty) unless
        `keep`."""
        with self._lock:
            self._file.close()
        if not keep:
            os.remove(self.path)
            if self._made_dir:
                with contextlib.suppress(OSError):  # not empty: another journal is in it
                    os.rmdir(os.path.dirname(self.path))


def read(path):
    """`(header, records)` of a journal; a line cut short by a killed process is ignored."""
    lines = []
    with open(path) as file:
        for line in file:
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
    if not lines or lines[0].get("kind") != "run":
        raise ValueError(f"Argument `path` is not an optiscope journal (spool file): {path!r}")
    return lines[0], lines[1:]


# ---------------------------------------------------------------------- journals left behind
def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True
    try:
        with open(f"/proc/{int(pid)}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except (OSError, IndexError):
        return True


def _abandoned(path):
    """Whether the journal's writer is gone and it was not replayed. Reads the header, and for
    a dead writer scans the lines for a replay mark without parsing them: this runs when
    every training begins, on journals of any size."""
    try:
        with open(path, "rb") as file:
            header = json.loads(file.readline())
            if header.get("kind") != "run":
                return False
            if header.get("host") == socket.gethostname():
                if _alive(header.get("pid")):
                    return False
            elif time.time() - os.path.getmtime(path) <= STALE_SECONDS:
                return False
            return not any(line.startswith(_REPLAYED_MARK) for line in file)
    except (OSError, ValueError):
        return False


def pending(spool_dir=DEFAULT_SPOOL_DIR):
    """Paths of the journals in `spool_dir` whose process died before delivering them and
    that were not replayed yet (on another host: untouched for an hour)."""
    paths = sorted(glob.glob(os.path.join(glob.escape(os.fspath(spool_dir)), "*" + SUFFIX)))
    return [os.path.abspath(p) for p in paths if _abandoned(p)]


_warned = set()


def warn_pending(spool_dir=DEFAULT_SPOOL_DIR):
    """Warns once per journal about those `pending` finds; returns their paths."""
    paths = pending(spool_dir)
    new = [p for p in paths if p not in _warned]
    if new:
        _warned.update(new)
        warnings.warn(
            f"optiscope: {len(new)} MLflow run journal(s) in {os.path.abspath(spool_dir)} were "
            f"left undelivered by a process that ended: {', '.join(new)}. Deliver them with: "
            f"optiscope replay --pending --spool-dir {spool_dir}",
            RuntimeWarning,
            stacklevel=3,
        )
    return paths


# ---------------------------------------------------------------------- delivery
def next_batch(pending_records):
    """The next records to send together: consecutive metric records up to 1000 metrics, or
    one record of another kind."""
    if not pending_records:
        return []
    first = pending_records[0]
    if first["kind"] != "metrics":
        return [first]
    batch, count = [], 0
    for record in pending_records:
        if record["kind"] != "metrics" or count + len(record["metrics"]) > MAX_METRICS:
            break
        batch.append(record)
        count += len(record["metrics"])
    return batch


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
        elif kind == "experiment_tags":
            experiment = client.get_run(run_id).info.experiment_id
            for key, value in record["tags"].items():
                client.set_experiment_tag(experiment, key, value)
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


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""The tag by which the MLflow 3 UI opens an experiment on its training runs (not GenAI traces)."""


def experiment_id(client, name):
    """The id of experiment `name` (created, and tagged as a training experiment, if needed)."""
    from mlflow.exceptions import MlflowException

    if name is None:
        return "0"
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, tags=EXPERIMENT_KIND)
        except MlflowException as error:  # another process or sink created it meanwhile
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    for key, value in EXPERIMENT_KIND.items():
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


# ---------------------------------------------------------------------- replay
def _existing_run(client, run_id):
    """The run, or None where the server has no run with this id."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _missing(client, run, records):
    """The records (or parts of them) that `run` does not have yet."""
    keys = {row[0] for r in records if r["kind"] == "metrics" for row in r["metrics"]}
    stored = {
        (key, m.step, m.timestamp) for key in keys for m in client.get_metric_history(run, key)
    }
    params = client.get_run(run).data.params
    artifacts = {}
    missing = []
    for record in records:
        kind = record["kind"]
        if kind == "metrics":
            rows = [row for row in record["metrics"] if (row[0], row[3], row[2]) not in stored]
            if rows:
                missing.append({**record, "metrics": rows})
        elif kind == "params":
            new = {k: v for k, v in record["params"].items() if k not in params}
            if new:
                missing.append({**record, "params": new})
        elif kind == "artifact":
            folder = record["artifact_path"]
            if folder not in artifacts:
                artifacts[folder] = {
                    os.path.basename(f.path) for f in client.list_artifacts(run, folder)
                }
            if os.path.basename(record["path"]) not in artifacts[folder]:
                missing.append(record)
        else:
            missing.append(record)
    return missing


def replay(path, tracking_uri=None, experiment_name=None):
    """Delivers a journal (spool file); returns the id of the run it went to.

    Args:
        path: the journal.
        tracking_uri: where to deliver. Defaults to None: the server the run was logged to.
        experiment_name: the experiment of a new run. Defaults to the logged one.

    Where the server has the original run, the run is completed: the points, params and
    artifacts it lacks are sent, nothing twice. Otherwise a new run is created (a nested run
    becomes a top-level run tagged with its parent's name). The run then ends with the status
    its process gave it (KILLED where the process died first) at the time of its last record.
    """
    from mlflow.tracking import MlflowClient

    from optiscope.tracking.mlflow_sink import check_tracking_uri

    check_tracking_uri(tracking_uri)
    header, lines = read(path)
    run_id = header.get("run_id")
    owns_run = header.get("owns_run", True)
    for line in lines:
        if line["kind"] == "run_id":
            run_id, owns_run = line["run_id"], line.get("owns_run", owns_run)
    records = [r for r in lines if r["kind"] not in _JOURNAL_ONLY]
    client = MlflowClient(check_tracking_uri(tracking_uri or header.get("tracking_uri")))
    if _existing_run(client, run_id) is not None:
        records = _missing(client, run_id, records)
    else:
        tags = dict(header.get("tags") or {})
        if header.get("parent_run_name"):
            tags["optiscope.parent_run_name"] = header["parent_run_name"]
        tags["optiscope.replayed_from"] = os.path.abspath(path)
        experiment = experiment_id(client, experiment_name or header.get("experiment_name"))
        run_id = client.create_run(
            experiment, run_name=header.get("run_name"), tags=tags, start_time=header.get("time")
        ).info.run_id
        owns_run = True
    ends = [r for r in records if r["kind"] == "end"]
    queue = collections.deque(r for r in records if r["kind"] != "end")
    while queue:
        batch = next_batch(queue)
        deliver_records(client, run_id, batch)
        for _ in batch:
            queue.popleft()
    if owns_run:
        last = max((r.get("time") or 0 for r in [header, *lines]), default=None)
        status = ends[-1]["status"] if ends else "KILLED"
        client.set_terminated(run_id, status, end_time=ends[-1].get("time") if ends else last)
    with open(path, "a") as file:  # "kind" first: `_abandoned` finds it by `_REPLAYED_MARK`
        file.write(json.dumps({"kind": "replayed", "run_id": run_id, "time": now_ms()}) + "\n")
    return run_id
