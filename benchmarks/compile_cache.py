"""Wall time of CLI commands with JAX's persistent compilation cache: off, cold, warm.

Each command runs in a fresh process (``python -m jaxattrib.cli``), three times in this order:

* ``off``: ``--compile-cache off`` (every program compiled, nothing written);
* ``cold``: ``--compile-cache DIR`` with an empty ``DIR`` (compiles and writes the entries);
* ``warm``: the same ``DIR`` again (reloads the entries instead of compiling); ``--repeats R``
  runs it R times and reports the median (every time is printed).

``--jax-threshold`` adds ``cold≥1s`` / ``warm≥1s`` rows with a second empty cache and JAX's own
default threshold (only programs that took >= 1 s to compile are cached,
``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1``) instead of the CLI's "cache every program".

Commands:

* ``concept-query``: ``jaxattrib concept-query RUN -p "a purple star on a black background"
  -c purple -c star --seed 0 --topk 5`` on a finished Concept-TRAK run (``--concept-run``,
  default ``runs/concept_trak_v2``; skipped when absent). The run directory is read only:
  the script checks that no file in it changed;
* ``demo`` (``--demo``): ``jaxattrib demo --run-dir TMP/demo_<row> --no-progress``, a new run
  directory per row, so every stage is recomputed and only compiled programs are shared.

Prints a table (seconds; ratio = row / off) and the cache size. Absolute times move with machine
load; the rows of one command run back to back.

    python benchmarks/compile_cache.py                       # concept-query only (~2 min)
    python benchmarks/compile_cache.py --jax-threshold --demo   # + threshold rows, demo (~20 min)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "a purple star on a black background"


def _snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def _run(top: list, args: list, env_extra: dict | None = None) -> float:
    env = dict(os.environ, **(env_extra or {}))
    env.pop("JAXATTRIB_COMPILE_CACHE", None)   # the option below decides
    cmd = [sys.executable, "-m", "jaxattrib.cli", *top, *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return dt


def _size(d: Path) -> tuple:
    files = [p for p in d.glob("*-cache")]
    return len(files), sum(p.stat().st_size for p in files) / 2**20


def measure(name: str, args_for, tmp: Path, jax_threshold: bool, repeats: int = 1) -> list:
    """Rows ``(command, setting, seconds, ratio to off, entries, MiB)``; ``args_for(row)`` gives
    the command's arguments for that row."""
    rows = []
    t_off = _run(["--compile-cache", "off"], args_for("off"))
    rows.append((name, "off", t_off, 1.0, "", ""))
    print(f"{name} off: {t_off:.1f} s", flush=True)
    settings = [("cold", "warm", tmp / f"cc_{name}", {})]
    if jax_threshold:
        settings.append(("cold≥1s", "warm≥1s", tmp / f"cc1_{name}",
                         {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}))
    for cold, warm, d, env in settings:
        for label, times in ((cold, 1), (warm, repeats)):
            ts = []
            for i in range(times):
                ts.append(_run(["--compile-cache", str(d)], args_for(f"{label}{i or ''}"), env))
                print(f"{name} {label}: {ts[-1]:.1f} s", flush=True)
            t = float(np.median(ts))
            n, mib = _size(d)
            rows.append((name, label + (f" (median of {times})" if times > 1 else ""), t,
                         t / t_off, n, f"{mib:.1f}"))
            print(f"  {n} entries, {mib:.1f} MiB", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concept-run", type=Path, default=Path("runs/concept_trak_v2"))
    ap.add_argument("--demo", action="store_true", help="Also time `jaxattrib demo`.")
    ap.add_argument("--jax-threshold", action="store_true",
                    help="Also rows with JAX's default 1 s caching threshold.")
    ap.add_argument("--repeats", type=int, default=1, help="Warm runs per cache (median).")
    ap.add_argument("--tmp", type=Path, default=None,
                    help="Folder for caches and demo run dirs (default: a new temporary one).")
    a = ap.parse_args()
    tmp = a.tmp or Path(tempfile.mkdtemp(prefix="jaxattrib_cc_"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"caches and run dirs under {tmp}; load: {os.getloadavg()}", flush=True)
    rows = []
    if (a.concept_run / "config.json").exists():
        before = _snapshot(a.concept_run)
        q = ["concept-query", str(a.concept_run), "-p", PROMPT, "-c", "purple", "-c", "star",
             "--seed", "0", "--topk", "5"]
        rows += measure("concept-query", lambda row: q, tmp, a.jax_threshold, a.repeats)
        changed = [k for k, v in _snapshot(a.concept_run).items() if before.get(k) != v]
        print(f"files changed in {a.concept_run}: {changed or 'none'}", flush=True)
    else:
        print(f"{a.concept_run}/config.json missing: concept-query skipped", flush=True)
    if a.demo:
        run_dir = lambda row: str(tmp / f"demo_{row.replace('≥', 'ge')}")  # noqa: E731
        rows += measure("demo", lambda row: ["demo", "--run-dir", run_dir(row), "--no-progress"],
                        tmp, a.jax_threshold, a.repeats)
    print(f"\nload after: {os.getloadavg()}")
    print("| command | cache | wall s | ratio to off | entries | MiB |\n|---|---|---|---|---|---|")
    for c, s, t, r, n, mib in rows:
        print(f"| {c} | {s} | {t:.1f} | {r:.2f} | {n} | {mib} |")


if __name__ == "__main__":
    main()
