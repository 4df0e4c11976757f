"""Ending runs that `model.fit` left open: an uncaught exception or Ctrl-C never reaches
`on_train_end`, so open sinks are closed here as FAILED or KILLED, files flushed."""

import atexit
import sys
import threading
import weakref

from optiscope.tracking.base import status_of  # noqa: F401 - part of this module's interface

_open = weakref.WeakSet()
_lock = threading.Lock()
_installed = False
_outcome = {"status": "FAILED"}


def _excepthook(kind, value, traceback):
    _outcome["status"] = "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
    close_all(_outcome["status"])
    _previous_hook(kind, value, traceback)


_previous_hook = sys.excepthook


def _at_exit():
    close_all(_outcome["status"])


def register(owner):
    """`owner.close_run(status)` will be called if the process ends with `owner` still open."""
    global _installed, _previous_hook
    with _lock:
        if not _installed:
            _previous_hook = sys.excepthook
            sys.excepthook = _excepthook
            atexit.register(_at_exit)
            _installed = True
        _open.add(owner)


def unregister(owner):
    with _lock:
        _open.discard(owner)


def close_all(status):
    with _lock:
        owners = list(_open)
        _open.clear()
    for owner in owners:
        owner.close_run(status)
