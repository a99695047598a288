"""Fault injection for the resumable commands (issue 22): SIGKILL a command at a random moment
inside a given stage, rerun it to completion, compare with an uninterrupted run.

A command runs as a subprocess (its own process group, stdout+stderr to a log file). A
:class:`Stage` is recognised by watching the attempt's output and the run directory: ``started``
and ``finished`` are predicates of ``(output of this attempt, run_dir)``. The reference
(uninterrupted) run is watched the same way, which gives each stage's duration; a fault run
waits for the stage to start, sleeps ``u * duration`` (``u`` uniform in [0, 1) from a seeded
``random.Random``) and kills the whole process group with SIGKILL — at once if the stage
finishes earlier (then the kill lands just after the stage; :attr:`Fault.inside` says which).

:func:`chained_faults` kills one attempt in each stage in turn (each rerun resumes from what the
previous attempts left), then runs the command to completion: one fault per stage for the cost
of about one run. Every fault is printed with its seed, so a failure is reproducible with
``FAULT_SEED=<seed>``.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    started: Callable[[str, Path], bool]
    finished: Callable[[str, Path], bool]


@dataclasses.dataclass
class Fault:
    stage: str
    seed: int
    fraction: float
    delay_s: float
    killed: bool          # False: the command exited by itself before the kill
    inside: bool          # the stage had started and not finished when the kill landed
    attempt_log: str


def command_env(compile_cache: Path | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    env["JAXATTRIB_COMPILE_CACHE"] = str(compile_cache) if compile_cache else "off"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli(*args: str) -> list[str]:
    """The ``jaxattrib`` CLI of this checkout as a subprocess argv."""
    return [sys.executable, "-c", "from jaxattrib.cli import main; main()", *args]


def _start(argv, log: Path, env) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    f = open(log, "wb")
    try:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO, start_new_session=True)
    finally:
        f.close()


def _text(log: Path) -> str:
    try:
        return log.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_to_completion(argv, run_dir: Path, log: Path, env, stages: Sequence[Stage] = (),
                      timeout: float = 900, poll: float = 0.05) -> dict[str, float]:
    """Runs ``argv`` to the end (asserting exit 0) and returns each stage's observed duration
    in seconds (stages not seen: absent)."""
    proc = _start(argv, log, env)
    t_start, t_end = {}, {}
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        now = time.monotonic()
        out = _text(log)
        for s in stages:
            if s.name not in t_start and s.started(out, run_dir):
                t_start[s.name] = now
            if s.name in t_start and s.name not in t_end and s.finished(out, run_dir):
                t_end[s.name] = now
        if rc is not None:
            break
        if now > deadline:
            _kill(proc)
            raise AssertionError(f"{argv} did not finish in {timeout} s; log {log}:\n{out[-3000:]}")
        time.sleep(poll)
    if rc != 0:
        raise AssertionError(f"{argv} exited {rc}; log {log}:\n{_text(log)[-3000:]}")
    return {k: t_end.get(k, time.monotonic()) - t for k, t in t_start.items()}


def kill_in_stage(argv, run_dir: Path, stage: Stage, duration: float, seed: int, log: Path,
                  env, timeout: float = 900, poll: float = 0.02) -> Fault:
    """Starts ``argv``, waits for ``stage`` to start, sleeps a random fraction of ``duration``
    (seeded by ``seed``) and SIGKILLs the process group."""
    u = random.Random(seed).random()
    delay = u * duration
    proc = _start(argv, log, env)
    deadline = time.monotonic() + timeout
    t0 = None
    killed = inside = False
    while True:
        if proc.poll() is not None:
            break
        out = _text(log)
        now = time.monotonic()
        if now > deadline:
            _kill(proc)
            raise AssertionError(f"{argv}: stage {stage.name} not reached in {timeout} s")
        if t0 is None and stage.started(out, run_dir):
            t0 = now
        if t0 is not None:
            done = stage.finished(out, run_dir)
            if done or now - t0 >= delay:
                inside = not done
                _kill(proc)
                killed = True
                break
        time.sleep(poll)
    fault = Fault(stage.name, seed, u, delay, killed, inside, str(log))
    print(f"fault: {fault}", flush=True)
    return fault


def chained_faults(argv, run_dir: Path, stages: Sequence[Stage], durations: dict[str, float],
                   seed: int, log_dir: Path, env, timeout: float = 900) -> list[Fault]:
    """One SIGKILL at a random point of each stage in order (a stage the previous attempts
    already finished is skipped: listed with ``killed=False``), then a final run to
    completion. Returns one :class:`Fault` per stage."""
    faults = []
    rng = random.Random(seed)
    for i, stage in enumerate(stages):
        stage_seed = rng.randrange(2 ** 31)
        if stage.finished("", run_dir):
            f = Fault(stage.name, stage_seed, 0.0, 0.0, False, False, "(skipped: finished by an "
                      "earlier attempt)")
            print(f"fault: {f}", flush=True)
        else:
            f = kill_in_stage(argv, run_dir, stage, durations.get(stage.name, 1.0), stage_seed,
                              log_dir / f"attempt_{i:02d}_{stage.name}.log", env,
                              timeout=timeout)
        faults.append(f)
    run_to_completion(argv, run_dir, log_dir / "final.log", env, timeout=timeout)
    return faults


def arrays_of_run(run_dir: Path, patterns: Sequence[str] = ("**/*.npy", "**/*.npz")) -> dict:
    """``{relative path[/member]: array}`` of every ``.npy`` / ``.npz`` under ``run_dir``
    (temp files excluded)."""
    import numpy as np
    out = {}
    for pat in patterns:
        for p in sorted(run_dir.glob(pat)):
            rel = p.relative_to(run_dir).as_posix()
            if p.name.startswith(".") or ".tmp" in p.name:
                continue
            if p.suffix == ".npz":
                with np.load(p, allow_pickle=False) as z:
                    for k in z.files:
                        out[f"{rel}/{k}"] = z[k]
            else:
                out[rel] = np.load(p, allow_pickle=False)
    return out


def record_params(record_dir: Path) -> dict:
    """``{'step_<k>/<path>': array}`` of every checkpoint's trainable state in a record."""
    import jax
    import numpy as np

    from jaxattrib.train.record import TrajectoryRecord
    rec = TrajectoryRecord.open(Path(record_dir).resolve())
    out = {}
    try:
        for s in rec.steps():
            st = rec.load_train_state(s)
            for path, leaf in jax.tree_util.tree_leaves_with_path(st):
                out[f"step_{s}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    finally:
        rec.close()
    return out


def assert_same_arrays(got: dict, want: dict, what: str) -> None:
    import numpy as np
    assert sorted(got) == sorted(want), (what, sorted(set(got) ^ set(want)))
    for k in want:
        a, b = np.asarray(got[k]), np.asarray(want[k])
        assert a.dtype == b.dtype and a.shape == b.shape, (what, k, a.dtype, a.shape, b.dtype,
                                                            b.shape)
        assert a.tobytes() == b.tobytes(), f"{what}: {k} differs after resume (not bit-identical)"
