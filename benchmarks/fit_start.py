"""What a fit's start costs the training thread: `OptimizerStatsLogger.on_train_begin` with an
MLflow sink, with an empty spool directory and with one holding journals that processes which
died left behind (the logger looks for them at every start to warn about them). Fastest of
`--rounds` interleaved starts.

    python benchmarks/fit_start.py [--journals 20] [--records 200] [--rounds 5]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import _timing

from optiscope.callbacks import OptimizerStatsLogger
from optiscope.optimizers import InstrumentedAdam
from optiscope.tracking import MlflowSink, journal


def abandoned_journals(spool_dir, count, records):
    """`count` journals of a process that has ended, each with `records` metric records of
    100 points (about 10 KB a record)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(spool_dir, exist_ok=True)
    row = [["optimizer/grad_norm/dense/kernel", 0.5, 0, 1]] * 100
    for index in range(count):
        header = {"kind": "run", "time": 0, "pid": dead.pid, "host": os.uname().nodename}
        with open(os.path.join(spool_dir, f"run{index}{journal.SUFFIX}"), "w") as file:
            file.write(json.dumps({**header, "run_name": f"run{index}"}) + "\n")
            line = json.dumps({"kind": "metrics", "metrics": row, "time": 0}) + "\n"
            file.writelines([line] * records)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--journals", type=int, default=20)
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="optiscope-bench-")
    uri = f"sqlite:///{work}/mlflow.db"
    left_behind = os.path.join(work, "left-behind")
    abandoned_journals(left_behind, args.journals, args.records)
    size = sum(os.path.getsize(os.path.join(left_behind, n)) for n in os.listdir(left_behind))

    _, loss, x, y = _timing.workload("mlp")
    model = _timing.california_mlp()
    model.compile(optimizer=InstrumentedAdam(1e-3), loss=loss)
    model.fit(x[:64], y[:64], verbose=0)

    def start(spool_dir):
        """Seconds of one `on_train_begin` (the run is closed afterwards, untimed)."""
        logger = OptimizerStatsLogger(
            sinks=[MlflowSink(tracking_uri=uri, spool_dir=spool_dir)], close_sinks=True
        )
        logger.set_model(model)
        logger.set_params({"steps": 645, "epochs": 1})
        begin = time.perf_counter()
        logger.on_train_begin()
        seconds = time.perf_counter() - begin
        logger.close_run("FINISHED")
        return seconds

    variants = {
        "empty spool directory": os.path.join(work, "empty"),
        f"{args.journals} journals left behind ({size / 1e6:.0f} MB)": left_behind,
    }
    times = {name: [] for name in variants}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spool_dir in variants.values():
            start(spool_dir)  # warm up
        for _ in range(args.rounds):
            for name, spool_dir in variants.items():
                times[name].append(start(spool_dir))
    times = {name: min(samples) for name, samples in times.items()}
    print(f"# OptimizerStatsLogger.on_train_begin with an MLflow sink; {_timing.machine()}")
    base = next(iter(times.values()))
    for name, seconds in times.items():
        print(f"{name:<40}{seconds * 1e3:>9.1f} ms{seconds / base:>8.2f}x")


if __name__ == "__main__":
    main()
