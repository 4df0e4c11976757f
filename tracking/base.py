"""The sink interface, a sink that does nothing, and a list of sinks behind one interface."""

import io
import logging
import warnings

log = logging.getLogger("optiscope.tracking")

STATUSES = ("FINISHED", "FAILED", "KILLED")


STATISTICS_CATEGORY = "optimizer"  # the custom-scalar heading of the optimizer statistics


class Sink:
    """Where tracking records go. Every method may be called from a callback thread; a sink
    never raises into training (`SinkList` also guards each call).

    Steps are 1-based: the optimizer update count, or the epoch number for epoch records.
    """

    def log_params(self, params):
        """`params`: flat mapping of names to values (hyperparameters, descriptions)."""

    def log_metrics(self, metrics, step):
        """`metrics`: mapping of tag to float, all at `step`."""

    def log_histograms(self, histograms, step):
        """`histograms`: mapping of tag to a NumPy array of values."""

    def log_figure(self, name, figure, step):
        """A matplotlib figure, or a PNG image's bytes (an image in TensorBoard, a PNG artifact
        in MLflow; see `png`)."""

    def log_artifact(self, path, artifact_path=None):
        """A local file kept with the run."""

    def log_layout(self, charts, category=STATISTICS_CATEGORY):
        """`charts`: mapping of chart title to the regular expressions of the tags it draws
        together (Python `re`, matched from the tag's start), shown under the heading
        `category`. The optimizer statistics' category comes after a run's own ones."""

    def log_hparams(self, hparams, metrics):
        """Hyperparameters and final metrics of the run, for side-by-side comparison."""

    def log_event(self, message, step):
        """A notable event (e.g. divergence) as text."""

    def flush(self):
        """Delivers what is buffered, as far as the back end allows."""

    def close(self, status="FINISHED"):
        """Ends the run with `status` (FINISHED, FAILED or KILLED); idempotent."""

    def child(self, name, tags=None, nested=True):
        """A sink for a run under this one, named `name` (e.g. one setting of a comparison):
        a subdirectory in TensorBoard, a run nested under this one in MLflow (`nested=False`:
        a top-level run of the same experiment). `tags` mark the run where the back end keeps
        tags. The caller closes the child."""
        return NullSink()

    def location(self):
        """Where this sink writes, for a person to open (a path or URL), or None."""
        return None

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        self.close("FINISHED" if value is None else status_of(value))
        return False


class NullSink(Sink):
    """Accepts everything and keeps nothing (e.g. on non-chief workers)."""


def png(figure):
    """The PNG image of a matplotlib figure, or `figure` itself when it already is PNG bytes."""
    if isinstance(figure, bytes):
        return figure
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


class SinkList(Sink):
    """Several sinks behind one interface. A sink whose call fails is warned about once per
    method and never stops the others."""

    def __init__(self, sinks):
        self.sinks = list(sinks)
        self._warned = set()

    def _each(self, method, *args, **kwargs):
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args, **kwargs)
            except Exception as err:  # a tracking failure never stops training
                key = (id(sink), method)
                if key not in self._warned:
                    self._warned.add(key)
                    warnings.warn(
                        f"optiscope: {type(sink).__name__}.{method} failed and was skipped: "
                        f"{type(err).__name__}: {err}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                log.debug("sink call failed", exc_info=True)

    def log_params(self, params):
        self._each("log_params", params)

    def log_metrics(self, metrics, step):
        self._each("log_metrics", metrics, step)

    def log_histograms(self, histograms, step):
        self._each("log_histograms", histograms, step)

    def log_figure(self, name, figure, step):
        if len(self.sinks) > 1:
            figure = png(figure)  # drawn once for every sink
        self._each("log_figure", name, figure, step)

    def log_artifact(self, path, artifact_path=None):
        self._each("log_artifact", path, artifact_path)

    def log_layout(self, charts, category=STATISTICS_CATEGORY):
        self._each("log_layout", charts, category)

    def log_hparams(self, hparams, metrics):
        self._each("log_hparams", hparams, metrics)

    def log_event(self, message, step):
        self._each("log_event", message, step)

    def flush(self):
        self._each("flush")

    def close(self, status="FINISHED"):
        self._each("close", status)

    def child(self, name, tags=None, nested=True):
        children = []
        for sink in self.sinks:
            try:
                children.append(sink.child(name, tags=tags, nested=nested))
            except Exception as err:  # a tracking failure never stops training
                warnings.warn(
                    f"optiscope: {type(sink).__name__}.child failed and was skipped: "
                    f"{type(err).__name__}: {err}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return SinkList(children)

    def location(self):
        places = [place for sink in self.sinks if (place := sink.location())]
        return ", ".join(places) or None


def status_of(exception):
    """FAILED, or KILLED for Ctrl-C."""
    return "KILLED" if isinstance(exception, KeyboardInterrupt) else "FAILED"


def check_status(status):
    if status not in STATUSES:
        raise ValueError(
            f"Argument `status` must be one of {STATUSES}. Received: status={status!r}"
        )
    return status
