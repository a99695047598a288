"""The command-line edge shared by the benchmark scripts under ``benchmarks/``: one argument
parser (``--run-dir``, ``--smoke``, ``--set``, ``--fresh``, ``--no-progress``, ``-v``/``-q``) and
one way to resolve the run directory (which also sets up logging, :func:`jaxattrib.logs.configure`),
and one way to end on bad input (:func:`exit_on_bad_input`: one ``error:`` line, exit 2, no
traceback), so every benchmark behaves the same from the shell."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path


def benchmark_parser(doc: str, default_run_dir: str, smoke_help: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes; the first line of ``doc`` is
    its description and ``default_run_dir`` (``runs/NAME``; ``_smoke`` appended under
    ``--smoke``) is named in the ``--run-dir`` help. Scripts add their own options to it."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--run-dir", default=None,
                    help=f"run directory (default {default_run_dir}[_smoke]); reused")
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--fresh", action="store_true", help="delete the run directory first")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("-v", "--verbose", action="count", default=0,
                    help="more messages on stderr (-v debug, -vv also third-party noise)")
    ap.add_argument("-q", "--quiet", action="count", default=0,
                    help="fewer messages on stderr (-q notices and errors only)")
    return ap


def prepare_run_dir(args: argparse.Namespace, default_run_dir: str) -> Path:
    """``--run-dir`` or the default (with ``_smoke`` under ``--smoke``); deleted first under
    ``--fresh``. Also points the ``jaxattrib`` loggers at stderr at the ``-v``/``-q`` level."""
    from jaxattrib.logs import configure
    configure(getattr(args, "verbose", 0) - getattr(args, "quiet", 0))
    run_dir = Path(args.run_dir or (default_run_dir + "_smoke" if args.smoke
                                    else default_run_dir))
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    return run_dir


@contextlib.contextmanager
def exit_on_bad_input():
    """Ends the script with ``error: <message>`` on stderr and exit status 2 when the body
    raises :class:`jaxattrib.config.ConfigError` (a config, run directory or input the user can
    fix, e.g. a run directory made with another config); the run directory keeps everything
    already computed."""
    from jaxattrib.config import ConfigError
    try:
        yield
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
