"""Logging at the edges: the ``jaxattrib`` logger hierarchy and the entry points' set-up.

[design] Every library module logs to ``logging.getLogger(__name__)`` (so to a child of the
``jaxattrib`` logger) and never adds a handler or sets a level: a program importing the library
decides where its messages go. Without any set-up Python's last-resort handler still prints
WARNING and above (our notices) on stderr. Only the entry points (``jaxattrib`` CLI,
``python -m jaxattrib.launch``) call :func:`configure`, which

* puts one stderr handler on the ``jaxattrib`` logger, formatting WARNING as ``notice: ...``,
  ERROR as ``error: ...``, INFO as the bare message and DEBUG as ``debug [module]: ...``;
* sets its level from the verbosity (``-q`` → WARNING, ``-qq`` → ERROR, default INFO, ``-v`` →
  DEBUG);
* filters known third-party noise (:data:`NOISE`), unless the verbosity is ``-vv`` or more,
  which shows everything.

Levels used in the library: DEBUG for internals a developer wants, INFO for progress of a stage
(what is being computed, where it is written), WARNING for notices the user should read (an
input was adjusted, ignored or recovered).
"""

from __future__ import annotations

import logging
import sys

ROOT = "jaxattrib"

#: (logger name, substring of the record's unformatted message) of third-party messages that
#: say nothing to a jaxattrib user; hidden by :func:`configure` below verbosity 2.
#: * orbax logs ``Given directory is read only=...`` every time a CheckpointManager opens a
#:   record for reading (``read_only=True`` is what we ask for);
NOISE = (("absl", "Given directory is read only"),)

_HANDLER_TAG = "_jaxattrib_cli_handler"


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stderr`` (test runners and ``CliRunner`` swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:   # StreamHandler.__init__ assigns it
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"notice: {msg}"
        if record.levelno >= logging.INFO:
            return msg
        return f"debug [{record.name}]: {msg}"


class NoiseFilter(logging.Filter):
    """Drops the records of :data:`NOISE` logged to one third-party logger."""

    def __init__(self, substrings: tuple[str, ...]):
        super().__init__()
        self.substrings = substrings

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else str(record.msg)
        return not any(s in msg for s in self.substrings)


def level_for(verbosity: int) -> int:
    """``-qq`` (-2) → ERROR, ``-q`` (-1) → WARNING, 0 → INFO, ``-v`` (1 or more) → DEBUG."""
    if verbosity <= -2:
        return logging.ERROR
    if verbosity == -1:
        return logging.WARNING
    if verbosity == 0:
        return logging.INFO
    return logging.DEBUG


def configure(verbosity: int = 0) -> logging.Logger:
    """Entry points only: the ``jaxattrib`` logger's stderr handler and level, and the
    third-party noise filters (off from verbosity 2). Idempotent: a second call replaces the
    first's handler and filters. Returns the ``jaxattrib`` logger."""
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if getattr(h, _HANDLER_TAG, False):
            logger.removeHandler(h)
    handler = _StderrHandler()
    setattr(handler, _HANDLER_TAG, True)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(level_for(verbosity))
    by_logger: dict[str, list[str]] = {}
    for name, text in NOISE:
        by_logger.setdefault(name, []).append(text)
    for name, texts in by_logger.items():
        third = logging.getLogger(name)
        for f in list(third.filters):
            if isinstance(f, NoiseFilter):
                third.removeFilter(f)
        if verbosity < 2:
            third.addFilter(NoiseFilter(tuple(texts)))
    return logger


def unconfigure() -> None:
    """Undoes :func:`configure` (an entry point that returns to its caller, e.g. a test running
    the CLI in-process, leaves the loggers as it found them)."""
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if getattr(h, _HANDLER_TAG, False):
            logger.removeHandler(h)
    logger.setLevel(logging.NOTSET)
    for name, _ in NOISE:
        third = logging.getLogger(name)
        for f in list(third.filters):
            if isinstance(f, NoiseFilter):
                third.removeFilter(f)
