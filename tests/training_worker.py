"""A training process for the tracking-server load tests (run as a script, not a test).

    python training_worker.py OUT.json --tracking-uri URI --experiment NAME --run-name NAME
        [--epochs N] [--multi-worker]

Fits the small model of `test_tracking_servers` with an `OptimizerStatsLogger` (interval 1)
whose sinks are an `MlflowSink` and a recording sink, and writes to OUT.json every metric point
the logger handed to its sinks, the run id and whether the sink spooled. `--multi-worker`
trains under `MultiWorkerMirroredStrategy` (the cluster from `TF_CONFIG`): only the chief's
logger writes.
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402
from test_tracking_servers import RecordingSink, fit, make_model  # noqa: E402

from optiscope.callbacks import OptimizerStatsLogger  # noqa: E402
from optiscope.optimizers import InstrumentedAdam  # noqa: E402
from optiscope.tracking import MlflowSink  # noqa: E402


def multi_worker_scope():
    """`MultiWorkerMirroredStrategy`'s scope, with the two Keras 3.15 work-arounds that
    tests/test_distributed.py explains; returns (scope, prepare(model))."""
    import keras.src.backend.tensorflow.trainer as keras_tf_trainer

    keras_tf_trainer._collective_all_reduce_multi_worker = lambda strategy: False

    def prepare(model):
        with model.distribute_strategy.scope():
            model.optimizer.build(model.trainable_variables)
        model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None

    return tf.distribute.MultiWorkerMirroredStrategy().scope(), prepare


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--multi-worker", action="store_true")
    args = parser.parse_args()

    sink = MlflowSink(
        tracking_uri=args.tracking_uri,
        experiment_name=args.experiment,
        run_name=args.run_name,
        spool_dir=os.path.dirname(os.path.abspath(args.out)),
        close_timeout=60,
    )
    recorder = RecordingSink()
    logger = OptimizerStatsLogger(sinks=[sink, recorder], interval=1, close_sinks=True)
    if args.multi_worker:
        scope, prepare = multi_worker_scope()
        with scope:
            model = make_model(InstrumentedAdam(learning_rate=0.01))
            model.compile(optimizer=model.optimizer, loss="mse", jit_compile=False)
        prepare(model)
    else:
        model = make_model(InstrumentedAdam(learning_rate=0.01))
    fit(model, [logger], epochs=args.epochs)
    if sink.run_id is None:  # not the chief: the sink never got a record; drop its journal
        sink._journal.close(keep=False)
    with open(args.out, "w") as file:
        json.dump(
            {
                "run_id": sink.run_id,
                "spool_path": sink.spool_path,
                "points": sorted(map(list, recorder.mlflow_points()), key=str),
            },
            file,
        )


if __name__ == "__main__":
    main()
