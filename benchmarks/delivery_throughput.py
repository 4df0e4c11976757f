"""Delivery throughput of `MlflowSink`: metric points per second into three MLflow back ends.

Back ends, side by side in one run: the team set-up of `optiscope server` (`mlflow server` on a
PostgreSQL cluster, artifacts served), the same `mlflow server` on a SQLite store, and a local
SQLite store written directly (`sqlite:///...`). Each timed call is one run: STEPS steps of KEYS
metrics handed to a new sink, as the logger does, and `close()` (everything delivered, the run
ended); calls are timed in interleaved rounds and compared by their fastest rounds. Every
run's points are counted on the back end afterwards.

    python benchmarks/delivery_throughput.py [--rounds 5] [--steps 200] [--keys 100]
"""

import argparse
import os
import shutil
import tempfile

import _timing
from mlflow.tracking import MlflowClient

from optiscope.experiments.server import TeamServer, TrackingServer
from optiscope.tracking import MlflowSink


def deliver(uri, steps, keys, runs):
    """One run of `steps` x `keys` points through a new sink; keeps (uri, run id)."""
    sink = MlflowSink(tracking_uri=uri, experiment_name="throughput", close_timeout=600)
    for step in range(1, steps + 1):
        sink.log_metrics({f"optimizer/m{k}": step + k / keys for k in range(keys)}, step=step)
    sink.close()
    if sink.spool_path is not None:
        raise RuntimeError(f"{uri}: records undelivered ({sink.last_error})")
    runs.append((uri, sink.run_id))


def count_points(uri, run_id):
    client = MlflowClient(uri)
    return sum(
        len(client.get_metric_history(run_id, key)) for key in client.get_run(run_id).data.metrics
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="mlflow server workers (both)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="optiscope-bench-")
    os.chmod(work, 0o755)  # PostgreSQL's unprivileged user must reach its cluster
    team = TeamServer(os.path.join(work, "team"), workers=args.workers)
    sqlite_server = TrackingServer(
        f"sqlite:///{work}/server.db",
        os.path.join(work, "sqlite-artifacts"),
        os.path.join(work, "sqlite-server.log"),
        workers=args.workers,
    )
    try:
        team.start()
        sqlite_server.start()
        uris = {
            "mlflow server on PostgreSQL (`optiscope server`)": team.tracking_uri,
            "mlflow server on SQLite": sqlite_server.url,
            "local SQLite store (sqlite:///)": f"sqlite:///{work}/local.db",
        }
        runs = []
        for uri in uris.values():  # warm-up: experiment creation, first connections
            deliver(uri, 2, args.keys, [])
        timings = _timing.interleaved(
            {
                name: lambda uri=uri: deliver(uri, args.steps, args.keys, runs)
                for name, uri in uris.items()
            },
            rounds=args.rounds,
        )
        points = args.steps * args.keys
        for uri, run_id in runs:
            found = count_points(uri, run_id)
            if found != points:
                raise RuntimeError(f"{uri}: run {run_id} has {found} of {points} points")
        local = points / timings["local SQLite store (sqlite:///)"]
        print(f"{_timing.machine()}; {args.rounds} rounds of {points} points a run")
        print(f"every run counted on its back end: {len(runs)} runs x {points} points found\n")
        print("| back end | s/run | points/s | vs local SQLite |")
        print("| --- | --- | --- | --- |")
        for name, seconds in timings.items():
            rate = points / seconds
            print(f"| {name} | {seconds:.2f} | {rate:,.0f} | {rate / local:.2f}× |")
    finally:
        sqlite_server.stop()
        team.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
