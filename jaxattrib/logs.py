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

The CLI also calls :func:`filter_native_stderr` (below ``-vv``): XLA's C++ "Very slow compile?
... file a bug" block, written straight to fd 2, is replaced by one line saying what it means.

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
#: * orbax logs ``Given directory is read only=...`` and ``CheckpointManagerOptions.read_only=True,
#:   setting save_interval_steps=0`` every time a CheckpointManager opens a record for reading
#:   (``read_only=True`` is what jaxattrib.train.record asks for).
NOISE = (("absl", "Given directory is read only"),
         ("absl", "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0"))

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


def _import_absl() -> None:
    """absl.logging makes the ``absl`` logger an ``ABSLLogger`` when it is first imported; a
    plain logger made earlier under that name (by getting it to add a filter) would stay plain
    and break absl's own methods. So absl is imported before its logger is touched."""
    try:
        import absl.logging  # noqa: F401
    except ImportError:
        pass


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
    # absl.logging.log calls logging.basicConfig() when the root logger has no handler (orbax
    # logs through absl at import), which would print each of our records a second time, as
    # ``INFO:jaxattrib...:``: while configured, our records stop at our handler.
    logger.propagate = False
    _import_absl()
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
    logger.propagate = True
    _import_absl()
    for name, _ in NOISE:
        third = logging.getLogger(name)
        for f in list(third.filters):
            if isinstance(f, NoiseFilter):
                third.removeFilter(f)


# ----------------------------------------------------------------------------- native stderr

#: set to 1 to leave the process's native stderr (fd 2) alone (no :func:`filter_native_stderr`)
RAW_STDERR_ENV = "JAXATTRIB_RAW_STDERR"

#: XLA's SlowCompilationAlarm (xla/service/slow_operation_alarm.cc) logs, with C++ LOG(ERROR)
#: straight to fd 2, ``Very slow compile? If you want to file a bug, run with envvar
#: XLA_FLAGS=--xla_dump_to=/tmp/foo and attach the results.`` between two lines of stars when
#: one compilation has run for 2 minutes (then at doubling intervals). No XLA flag turns it off
#: and TF_CPP_MIN_LOG_LEVEL=3 would hide every C++ error, so the CLI replaces just this block
#: with :data:`SLOW_COMPILE_HINT`.
SLOW_COMPILE_HINT = (b"jaxattrib: XLA has been compiling one program for over 2 minutes (slow "
                     b"on a loaded CPU; the compilation cache keeps it for the next run)\n")

_FILTER_CODE = r'''
import os, re, sys
block = re.compile(rb"[^\n]*slow_operation_alarm\.cc:\d+\][^\n]*\n(?:[^\n]*\n){0,6}?"
                   rb"[^\n]*Very slow compile\?[^\n]*(?:\n\*+[ \t]*)?(?:\n|$)")
line = re.compile(rb"[^\n]*Very slow compile\?[^\n]*(?:\n|$)")
hint = HINT
while True:
    try:
        data = os.read(0, 1 << 16)
    except InterruptedError:
        continue
    if not data:
        break
    if b"Very slow compile?" in data:
        data, n = block.subn(hint, data)
        if not n:
            data = line.sub(hint, data)
    while data:
        data = data[os.write(1, data):]
'''

_native_filter: dict = {}


def filter_native_stderr() -> bool:
    """Entry points only: routes the process's fd 2 through a small filter process that drops
    XLA's "Very slow compile? ... file a bug" block (see :data:`SLOW_COMPILE_HINT`) and passes
    every other byte through unchanged, at once. Python's own ``sys.stderr`` (progress bars,
    messages) keeps writing straight to the original stderr, so terminal widths and colours
    are unchanged; only native (C++) writes to fd 2 pass the filter. The filter process outlives
    a crash of this one (it reads until the pipe closes), so a fatal native error is never lost.

    Does nothing (returns False) when ``$JAXATTRIB_RAW_STDERR`` is set, when ``sys.stderr`` is
    not the process's fd 2 (a test runner capturing it), or when already installed."""
    import os
    import subprocess
    if _native_filter or os.environ.get(RAW_STDERR_ENV, "") not in ("", "0"):
        return False
    try:
        if sys.stderr is not sys.__stderr__ or sys.stderr.fileno() != 2:
            return False
    except (AttributeError, ValueError, OSError):
        return False
    import io
    sys.stderr.flush()
    saved = os.dup(2)
    code = _FILTER_CODE.replace("HINT", repr(SLOW_COMPILE_HINT))
    try:
        child = subprocess.Popen([sys.executable, "-I", "-S", "-c", code], stdin=subprocess.PIPE,
                                 stdout=saved, stderr=saved, close_fds=True)
    except OSError:
        os.close(saved)
        return False
    os.dup2(child.stdin.fileno(), 2)
    child.stdin.close()   # fd 2 is now the pipe's only writer (with children that inherit it)
    sys.stderr = io.TextIOWrapper(io.FileIO(saved, "w", closefd=True),
                                  encoding=sys.__stderr__.encoding, errors="backslashreplace",
                                  line_buffering=True, write_through=True)
    _native_filter.update(child=child, saved=saved)

    import atexit

    def _drain() -> None:          # give the filter what is left before the shell prompt
        try:
            os.dup2(saved, 2)      # closes our end of the pipe: the filter reads EOF
            child.wait(timeout=5)
        except Exception:  # noqa: BLE001 — at exit, never raise
            pass
    atexit.register(_drain)
    return True
