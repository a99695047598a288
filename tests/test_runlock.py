"""One writer per run directory (jaxattrib.runlock + the CLI/launcher edge): a second writer is
refused at once naming the holder, a stale lock is recovered with a notice, readers need no
lock, and two real processes racing on one run directory give exactly one run, equal to a solo
run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bad_inputs import bad_input
from jaxattrib import runlock

ROOT = Path(__file__).resolve().parents[1]

# a process that takes the lock of argv[1], says so, and holds it until its stdin closes
HOLDER = ("import sys\nfrom jaxattrib.runlock import acquire\n"
          "with acquire(sys.argv[1], 'jaxattrib holder-test'):\n"
          "    print('locked', flush=True)\n    sys.stdin.read()\n")


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JAXATTRIB_COMPILE_CACHE="off",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


@pytest.fixture
def holder(tmp_path):
    """``hold(run_dir)`` starts a process holding that run directory's lock; returns it."""
    procs = []

    def hold(run_dir):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], env=_env(),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p
    yield hold
    for p in procs:
        p.stdin.close()
        p.wait(timeout=30)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@bad_input("A second writer (e.g. `jaxattrib demo`) on a run directory another command is "
           "writing", "Refused at once, exit 2: `run directory … is in use by pid P on host H "
           "(command '…', started …)`; the holder is untouched")
def test_second_writer_is_refused_at_once_naming_the_holder(tmp_path, holder, monkeypatch):
    from typer.testing import CliRunner
    import jaxattrib.cli
    import jaxattrib.runs.demo
    from jaxattrib.cli import app

    def refuse(*a, **k):
        raise AssertionError("the command ran")
    # at once: neither the compile cache nor the demo is touched (an AssertionError would
    # exit 1 through the safety net)
    monkeypatch.setattr(jaxattrib.cli, "_use_compile_cache", refuse)
    monkeypatch.setattr(jaxattrib.runs.demo, "run_demo", refuse)
    run = tmp_path / "run"
    h = holder(run)
    r = CliRunner().invoke(app, ["demo", "--run-dir", str(run), "--no-progress"])
    assert r.exit_code == 2, r.output
    assert f"is in use by pid {h.pid} on host {socket.gethostname()}" in r.output
    assert "jaxattrib holder-test" in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in run.iterdir()) == [runlock.LOCK_NAME]   # nothing written
    assert json.loads((run / runlock.LOCK_NAME).read_text())["pid"] == h.pid


@bad_input("A launch (`python -m jaxattrib.launch`) on an out_dir another command is writing",
           "Process 0 is refused at once, exit 2, naming the holder (multi-host launches take "
           "the lock once, on process 0)")
def test_launch_takes_the_lock_on_process_0(tmp_path, holder):
    from jaxattrib import launch
    out = tmp_path / "out"
    h = holder(out)
    rc = launch.main(["featurize", "featurize_digits", "--distributed", "off", "--no-progress",
                      "--set", f"out_dir='{out}'"])
    assert rc == 2
    assert not (out / "features").exists()
    h.stdin.close()
    h.wait(timeout=30)
    assert not (out / runlock.LOCK_NAME).exists()      # released by its holder on exit


@bad_input("A stale lock: the lock file names a process of this host that is no longer "
           "running (killed, crashed)", "Recovered: `notice: …: recovered a stale lock left by "
           "pid P …, which is no longer running`; the command runs")
def test_stale_lock_of_a_dead_process_is_recovered_with_a_notice(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    dead = _dead_pid()
    (run / runlock.LOCK_NAME).write_text(json.dumps(
        {"pid": dead, "host": socket.gethostname(), "command": "jaxattrib demo",
         "started": "2026-01-01T00:00:00Z", "pid_start": None}))
    with runlock.acquire(run, "jaxattrib train") as lock:
        assert lock.info["pid"] == os.getpid()
        assert json.loads((run / runlock.LOCK_NAME).read_text())["command"] == "jaxattrib train"
    assert f"recovered a stale lock left by pid {dead}" in caplog.text   # a WARNING
    assert not (run / runlock.LOCK_NAME).exists()


def test_reused_pid_is_stale_but_a_live_holder_without_flock_is_not(tmp_path, caplog):
    """The lock records the holder's start time: a live process with the holder's pid but
    another start time (pid reused) does not keep a stale lock alive."""
    run = tmp_path / "run"
    run.mkdir()
    me_start = runlock._pid_start(os.getppid())
    if me_start is None:
        pytest.skip("no /proc on this system")
    info = {"pid": os.getppid(), "host": socket.gethostname(), "command": "x", "started": "t"}
    (run / runlock.LOCK_NAME).write_text(json.dumps({**info, "pid_start": me_start + 1}))
    runlock.acquire(run, "y").release()
    assert "recovered a stale lock" in caplog.text
    (run / runlock.LOCK_NAME).write_text(json.dumps({**info, "pid_start": me_start}))
    with pytest.raises(runlock.RunLockError, match="that process is alive"):
        runlock.acquire(run, "y")


@bad_input("A lock file left by a process on another host (shared file system)",
           "Exit 2: it cannot be checked from here; the message names the host, the pid and "
           "the lock file to delete if that process is gone")
def test_lock_of_another_host_is_refused_with_the_file_to_delete(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / runlock.LOCK_NAME).write_text(json.dumps(
        {"pid": 12345, "host": "node-7", "command": "jaxattrib train", "started": "t"}))
    with pytest.raises(runlock.RunLockError) as e:
        runlock.acquire(run, "jaxattrib train")
    msg = str(e.value)
    assert "pid 12345 on host node-7" in msg and f"delete {run / runlock.LOCK_NAME}" in msg


@bad_input("`jaxattrib report` on a run directory another command is writing",
           "Runs: readers (`report`, `info`) take no lock")
def test_readers_need_no_lock(tmp_path, holder):
    from typer.testing import CliRunner
    from jaxattrib.cli import app
    from jaxattrib.report.html import write_result
    run = tmp_path / "run"
    write_result(run, "x", "a section", metrics={"m": 1.0})
    holder(run)
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 0, r.output
    assert (run / "report.html").is_file()


def test_fresh_empties_the_run_dir_but_keeps_the_lock(tmp_path):
    run = tmp_path / "run"
    (run / "features" / "a").mkdir(parents=True)
    (run / "features" / "a" / "x.npy").write_bytes(b"1")
    (run / "config.json").write_text("{}")
    assert runlock.has_results(run)
    with runlock.acquire(run, "t"):
        runlock.clear_run_dir(run)
        assert [p.name for p in run.iterdir()] == [runlock.LOCK_NAME]
        assert not runlock.has_results(run)


def _train_args(run, pipe):
    return ["train", "finetune_folder", "--run-dir", str(run), "--no-progress",
            "--set", f"model='{pipe}'", "--set", "data.source=digits", "--set", "data.size=8",
            "--set", "data.max_examples=8", "--set", "finetune.steps=2",
            "--set", "finetune.batch_size=4", "--set", "finetune.checkpoint_every=1"]


def _cli(args):
    return [sys.executable, "-m", "jaxattrib.cli", "--no-compile-cache", *args]


@bad_input("Two `jaxattrib train` processes started together on one run directory",
           "Exactly one runs; the other exits 2 at once naming the first's pid; the run equals "
           "a solo run")
def test_two_processes_racing_on_one_run_dir(tmp_path, tiny_pixel_pipeline):
    from jaxattrib.train.record import TrajectoryRecord
    run, solo = tmp_path / "twin", tmp_path / "solo"
    procs = [subprocess.Popen(_cli(_train_args(run, tiny_pixel_pipeline)), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    assert f"is in use by pid {procs[winner].pid}" in outs[loser][1]
    assert "Traceback" not in outs[loser][1]
    r = subprocess.run(_cli(_train_args(solo, tiny_pixel_pipeline)), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (run / "record" / "steps.jsonl").read_text() == \
        (solo / "record" / "steps.jsonl").read_text()
    a, b = TrajectoryRecord.open(run / "record"), TrajectoryRecord.open(solo / "record")
    assert a.steps() == b.steps() == [0, 1, 2]
    import jax
    pa, pb = a.load(2)["unet"], b.load(2)["unet"]
    for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not (run / runlock.LOCK_NAME).exists()


def test_file_system_without_flock_falls_back_to_the_lock_content(tmp_path, monkeypatch,
                                                                   caplog):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = tmp_path / "run"
    with runlock.acquire(run, "first") as lock:
        assert "does not support flock" in caplog.text
        caplog.clear()
        other = subprocess.run(
            [sys.executable, "-c", "import fcntl, errno, sys\n"
             "def f(fd, op): raise OSError(errno.ENOLCK, 'No locks available')\n"
             "fcntl.flock = f\nfrom jaxattrib.runlock import acquire, RunLockError\n"
             "try:\n    acquire(sys.argv[1], 'second')\nexcept RunLockError as e:\n"
             "    print(e); sys.exit(2)\n", str(run)], env=_env(), capture_output=True,
            text=True, timeout=60)
        assert other.returncode == 2 and f"in use by pid {lock.info['pid']}" in other.stdout
    (run / runlock.LOCK_NAME).write_text(json.dumps(
        {"pid": _dead_pid(), "host": socket.gethostname(), "command": "x", "started": "t"}))
    runlock.acquire(run, "third").release()
    assert "recovered a stale lock" in caplog.text
