"""The `optiscope` command."""

import argparse
import os


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="optiscope", description="See inside Keras optimizers while model.fit runs."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a small model with three instrumented optimizers, print statistics"
    )
    demo.add_argument("--epochs", type=_positive_int, default=3, help="epochs (default 3)")
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.command == "demo":
        from optiscope.experiments import demo as job

        job.main(epochs=args.epochs)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


if __name__ == "__main__":
    main()
