"""Progress of long stages: a terminal bar with rate and ETA, a callback, and a log file.

[design] Foundation-level helper used at the edges (featurization, fine-tuning, the launcher);
the numeric core never imports it.

* :class:`StageLog`: ``RUN/logs/<stage>.log`` (process ``p > 0`` of a multi-process launch:
  ``<stage>.process<p>.log``), one UTC-timestamped line per message, appended and flushed line
  by line, so a killed job leaves every line written before it died. Reruns append (a
  ``start`` line separates them).
* :class:`Progress`: advances by a number of units (e.g. examples of one microbatch); shows a
  tqdm bar (rate and ETA) when asked, calls ``callback(n)`` on every update, and writes a line
  with done/total, rate and ETA to its log at most every ``log_every_s`` seconds and at the end.
  The rate in the log is measured from the *second* update on, so the first update's one-off
  compilation does not skew the ETA.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

logger = logging.getLogger(__name__)


def _now() -> str:
    """UTC time to the millisecond, e.g. ``2026-12-07T03:30:00.123Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def log_path(run_dir: str | Path, stage: str, process_index: int = 0) -> Path:
    """``run_dir/logs/<stage>.log``, or ``<stage>.process<p>.log`` for process ``p > 0``."""
    name = f"{stage}.log" if process_index == 0 else f"{stage}.process{process_index}.log"
    return Path(run_dir) / "logs" / name


class StageLog:
    """Timestamped, line-buffered append-only log of one stage (see module doc).

    Call it with a message: ``log("featurize train: 64/1000 examples")`` writes
    ``2026-12-07T03:30:00.123Z [attribute] featurize train: 64/1000 examples``. ``echo`` also
    logs each line at INFO on the ``jaxattrib.progress`` logger (for jobs without a terminal
    bar)."""

    def __init__(self, run_dir: str | Path, stage: str, *, process_index: int | None = None,
                 echo: bool = False):
        if process_index is None:
            import jax
            process_index = jax.process_index()
        self.stage = stage
        self.echo = echo
        self.path = log_path(run_dir, stage, process_index)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1, encoding="utf-8")
        self(f"start (pid {os.getpid()}, process {process_index})")

    def __call__(self, msg: str) -> None:
        line = f"{_now()} [{self.stage}] {msg}"
        if self._f is not None:
            self._f.write(line + "\n")
        if self.echo:
            logger.info("%s", line)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "StageLog":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self(f"failed: {type(exc).__name__}: {exc}")
        else:
            self("done")
        self.close()


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """``total`` units of work; :meth:`update` after each piece (e.g. one microbatch).

    Args:
      total: units to do in this call (e.g. examples of the chunks still missing).
      desc / unit: labels of the bar and log lines.
      bar: show a tqdm bar (rate, ETA) on the terminal.
      log: a :class:`StageLog` (or any ``str -> None``) for periodic lines; None = none.
      callback: called with the units of every update (tests count microbatches with it).
      log_every_s: least seconds between two log lines (the last update always logs).
    """

    def __init__(self, total: int, desc: str, unit: str = "ex", *, bar: bool = True,
                 log: Optional[Callable[[str], None]] = None,
                 callback: Optional[Callable[[int], None]] = None, log_every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done = 0
        self.log, self.callback, self.log_every_s, self.clock = log, callback, log_every_s, clock
        self._t0 = clock()
        self._t1: float | None = None   # time of the first update (after compilation)
        self._done1 = 0
        self._last_log = -float("inf")
        self._bar = None
        if bar and total > 0:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True,
                             unit_scale=False)
        if log is not None:
            log(f"{desc}: {total} {unit} to do")

    def rate(self) -> float | None:
        """Units per second since the first update (None before the second)."""
        if self._t1 is None or self.done == self._done1:
            return None
        dt = self.clock() - self._t1
        return (self.done - self._done1) / dt if dt > 0 else None

    def eta(self) -> float | None:
        r = self.rate()
        return None if not r else (self.total - self.done) / r

    def status(self) -> str:
        """``'desc: 64/1000 ex (6.4%), 12.3 ex/s, ETA 0:01:16'``."""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        r, eta = self.rate(), self.eta()
        return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.1f}%), "
                + (f"{r:.3g} {self.unit}/s, ETA {_hms(eta)}" if r else "rate n/a")
                + f", elapsed {_hms(self.clock() - self._t0)}")

    def update(self, n: int) -> None:
        self.done += int(n)
        now = self.clock()
        if self._t1 is None:
            self._t1, self._done1 = now, self.done
        if self._bar is not None:
            self._bar.update(int(n))
        if self.callback is not None:
            self.callback(int(n))
        if self.log is not None and (now - self._last_log >= self.log_every_s
                                     or self.done >= self.total):
            self._last_log = now
            self.log(self.status())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
