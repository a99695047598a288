"""PNG screenshot of a local HTML report with headless Chromium (no network, throwaway profile).

``jaxattrib report RUN_DIR --screenshot OUT.png`` uses :func:`screenshot`; so does
``python -m jaxattrib.report.screenshot REPORT.html OUT.png [WIDTH,HEIGHT]``. It ships inside the
package (no script outside it), so it works from a wheel. Needs Debian's ``chromium`` package
(``apt-get install -y chromium``); ``CHROMIUM=/path`` picks another binary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from jaxattrib.report.html import ReportError

#: window size (width, height) in CSS pixels of the screenshot
DEFAULT_SIZE = (1200, 1600)

_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-dev-shm-usage", "--hide-scrollbars")


def find_chromium() -> Optional[str]:
    """``$CHROMIUM``, else ``chromium`` / ``chromium-browser`` on PATH; None if none."""
    return (os.environ.get("CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser"))


def screenshot(report: str | os.PathLike, out: str | os.PathLike,
               size: tuple[int, int] = DEFAULT_SIZE, *, timeout_s: float = 300.0) -> Path:
    """Renders ``report`` (an HTML file) into the PNG ``out`` (``size`` = width, height pixels);
    returns ``out``. Raises :class:`ReportError` naming the file when the report is missing,
    Chromium is not installed, fails, or writes no PNG (its log is in the message)."""
    report, out = Path(report).resolve(), Path(out).resolve()
    if not report.is_file():
        raise ReportError(f"{report}: no such report file")
    chromium = find_chromium()
    if not chromium:
        raise ReportError("--screenshot needs Chromium: apt-get install -y chromium (or set "
                          "CHROMIUM=/path/to/chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="jaxattrib-chromium-") as profile:
        cmd = [chromium, *_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}",
               f"--window-size={size[0]},{size[1]}", report.as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ReportError(f"{out}: Chromium did not finish the screenshot in "
                              f"{timeout_s:.0f} s") from None
        log = (proc.stdout + proc.stderr)[-2000:]
        if proc.returncode != 0:
            raise ReportError(f"{out}: Chromium failed (exit {proc.returncode}):\n{log}")
    if not out.is_file() or out.stat().st_size == 0:
        raise ReportError(f"{out}: Chromium wrote no screenshot:\n{log}")
    return out


def _parse_size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.split(","))
    return w, h


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m jaxattrib.report.screenshot REPORT.html OUT.png [WIDTH,HEIGHT]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 3):
        print("usage: python -m jaxattrib.report.screenshot REPORT.html OUT.png "
              "[WIDTH,HEIGHT]", file=sys.stderr)
        return 2
    try:
        size = _parse_size(args[2]) if len(args) == 3 else DEFAULT_SIZE
    except ValueError:
        print(f"size {args[2]!r}: expected WIDTH,HEIGHT, e.g. 1200,1600", file=sys.stderr)
        return 2
    try:
        print(screenshot(args[0], args[1], size))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
