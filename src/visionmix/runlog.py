"""The logging contract: what a run says, where it goes.

Everything a run says (epoch lines, notices such as the keys ``--init`` dropped, warnings such as a skipped image)
is a record of the ``visionmix`` logger. On the console (stderr) it is one line each, written around any progress
bar; ``progress=False`` (``--no-progress``) removes the bars and nothing else. A run directory also keeps its own
log, ``RUN_DIR/train.log`` (appended to on resume): the same lines with their time, the warnings, and the full
traceback of whatever stopped the run. An application that configures logging itself (a handler on ``visionmix``
or on the root logger) keeps its configuration: :func:`console_logging` then adds nothing.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

LOGGER = "visionmix"
FILE_ONLY = {"file_only": True}  # ``extra=`` of a record for the run's log alone (a traceback the console shows once)


def logger(name: str = "") -> logging.Logger:
    """The ``visionmix`` logger, or its child ``visionmix.<name>``."""
    return logging.getLogger(f"{LOGGER}.{name}" if name else LOGGER)


class _ConsoleHandler(logging.Handler):
    """One line per record on stderr, through ``tqdm.write`` so that a progress bar is redrawn below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # (logging's contract: a handler never raises; handleError reports it)
            self.handleError(record)


class _RunLogHandler(logging.FileHandler):
    """A run directory's log file (:func:`run_log`), opened once ``claimed()`` is true; records before that are
    held in memory. Not a console, so :func:`console_logging` still adds one."""

    def __init__(self, path: str | Path, claimed: Callable[[], bool]) -> None:
        super().__init__(path, encoding="utf-8", delay=True)
        self.claimed, self.waiting = claimed, list[logging.LogRecord]()

    def emit(self, record: logging.LogRecord) -> None:
        self.waiting.append(record)
        if self.claimed():
            for waiting in self.waiting:
                super().emit(waiting)
            self.waiting.clear()

    def close(self) -> None:
        if self.waiting and self.claimed():
            for waiting in self.waiting:
                super().emit(waiting)
        self.waiting.clear()
        super().close()


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


@contextmanager
def console_logging() -> Iterator[None]:
    """For the block, print ``visionmix`` records of level INFO and above on stderr, unless the application has
    configured logging (then its handlers decide)."""
    log = logger()
    if any(not isinstance(h, _RunLogHandler) for h in [*log.handlers, *logging.getLogger().handlers]):
        yield
        return
    handler = _ConsoleHandler(logging.INFO)
    handler.addFilter(_not_file_only)
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@contextmanager
def run_log(path: str | Path | None, claimed: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """For the block, append ``visionmix`` records and the warnings raised to ``path`` (``None``: do nothing, as on
    every rank but the first), with the traceback of an exception that leaves the block; the exception goes on.

    Records wait in memory until ``claimed()`` says the directory is the run's (its first checkpoint is written):
    a run that fails before that leaves no file behind in a directory it never owned."""
    if path is None:
        yield
        return
    log = logger()
    handler = _RunLogHandler(path, claimed)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    level = log.level
    log.setLevel(min(log.getEffectiveLevel(), logging.INFO))
    log.addHandler(handler)
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            handler.handle(log.makeRecord(LOGGER, logging.WARNING, "", 0, f"{category.__name__}: {message}", None,
                                          None))
            shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        try:
            yield
        except BaseException as exc:
            log.error("stopped: %s", type(exc).__name__, exc_info=True, extra=FILE_ONLY)
            raise
        finally:
            log.removeHandler(handler)
            log.setLevel(level)
            handler.close()
