"""Exceptions that reach ``threading.excepthook`` or ``sys.excepthook`` in the node's process: logged and counted.

An exception that escapes a thread ends that thread; without this it would only be printed to stderr. While the
node serves (:meth:`~.node.DicomNode.serve_forever`) each one is logged as ``CRITICAL Unhandled exception in
thread <name> ...`` with its traceback and counted in ``/metrics`` as ``fairdro_node_unhandled_exceptions``. None is
expected: ``make fuzz-pacs`` checks that malformed input never produces one.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

logger = logging.getLogger(__name__)


class UnhandledExceptions:
    """The count of exceptions that reached the process's exception hooks while :meth:`installed` was active."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def _record(self, thread: str, kind: type[BaseException], value: BaseException | None,
                tb: TracebackType | None) -> None:  # fmt: skip
        with self._lock:
            self.count += 1
        logger.critical("Unhandled exception in thread %s (%s: %s); see the traceback. Restart the node if /livez "
                        "reports a dead thread.", thread, kind.__name__, value, exc_info=(kind, value, tb))  # fmt: skip

    def _thread_hook(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:  # as threading's own hook: a thread that exits on purpose
            return
        name = args.thread.name if args.thread is not None else "(unknown)"
        self._record(name, args.exc_type, args.exc_value, args.exc_traceback)

    def _sys_hook(self, kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        self._record("MainThread", kind, value, tb)

    @contextmanager
    def installed(self) -> Iterator[UnhandledExceptions]:
        """Install both hooks for the duration of the ``with`` block; the previous hooks are restored after it."""
        previous = threading.excepthook, sys.excepthook
        threading.excepthook, sys.excepthook = self._thread_hook, self._sys_hook
        try:
            yield self
        finally:
            threading.excepthook, sys.excepthook = previous
