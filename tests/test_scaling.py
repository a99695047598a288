"""Attribution at real size: `python -m jaxattrib.launch attribute` on 2 jax.distributed
processes (each writes its own chunks) equals 1 process, and resumes after kill -9 of one
process; progress advances per microbatch (counted by construction) and stages log to the run
directory."""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxattrib import parallel
from jaxattrib.attribution import projection as pj
from jaxattrib.attribution import trak
from jaxattrib.attribution.store import ChunkedArray
from jaxattrib.progress import Progress, StageLog, log_path
from tiny import write_pngs

ROOT = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[(\w+)\] ")


# ------------------------------------------------------------------------------ progress
def _linear_out(params, x, key):
    return jnp.dot(x, params["w"])


def test_featurize_progress_once_per_microbatch_and_log_file(tmp_path):
    """n = 10, chunk 4, microbatch 3: chunks of 4, 4, 2 rows -> microbatches of 3, 1, 3, 1, 2
    examples; on a 2-device mesh microbatch 3 rounds up to 4 -> 4, 4, 2. A rerun after losing
    chunk 1 reports only its microbatches. The log file has timestamped lines ending at
    10/10."""
    x = np.random.RandomState(0).randn(10, 5).astype(np.float32)
    params = {"w": jnp.ones(5)}
    proj = pj.make_projector("rademacher", 8, 0, params)

    def run(folder, mesh=None, log=None):
        calls = []
        store = ChunkedArray.open(folder, n_rows=10, n_cols=8, chunk_size=4, meta=proj.meta())
        trak.featurize(_linear_out, params, x, proj, store, microbatch=3, mesh=mesh,
                       progress=False, on_progress=calls.append, log=log)
        return calls, store

    with StageLog(tmp_path / "run", "featurize", process_index=0) as log:
        calls, store = run(tmp_path / "a", log=log)
    assert calls == [3, 1, 3, 1, 2]
    calls2, _ = run(tmp_path / "b", mesh=parallel.make_mesh(2))
    assert calls2 == [4, 4, 2]
    for f in store.folder.glob("chunk_00001.*"):
        f.unlink()
    calls3, store = run(tmp_path / "a")
    assert calls3 == [3, 1] and store.complete()
    np.testing.assert_allclose(store.read_all(), x @ np.asarray(proj.materialize()), rtol=1e-5,
                               atol=1e-5)

    lines = log_path(tmp_path / "run", "featurize").read_text().splitlines()
    assert all(STAMP.match(line) for line in lines), lines
    assert "start" in lines[0] and lines[-1].endswith("[featurize] done")
    assert any("process 0/1 computes 3 chunk(s), 10 examples, 3 per microbatch" in line
               for line in lines), lines
    # the first microbatch logs at once (log_every_s=30 throttles the rest), the last always
    progress = [line for line in lines if "featurize a:" in line and "/10 ex" in line]
    assert "3/10 ex (30.0%)" in progress[0] and "10/10 ex (100.0%)" in progress[-1], progress


def test_progress_rate_and_eta_by_construction():
    """Rate counts from the first update on (its compile time excluded); ETA = rest / rate;
    the callback sees every update; log lines are throttled to log_every_s."""
    now = [0.0]
    lines, seen = [], []
    p = Progress(10, "feat", bar=False, log=lines.append, callback=seen.append, log_every_s=5,
                 clock=lambda: now[0])
    now[0] = 50.0
    p.update(2)                      # first (compiled) microbatch: logged at once
    now[0] = 51.0
    p.update(2)                      # throttled (1 s < 5 s after the last line)
    now[0] = 52.0                    # 2 ex in the 2 s since the first update
    assert p.rate() == pytest.approx(1.0) and p.eta() == pytest.approx(6.0)
    assert p.status() == "feat: 4/10 ex (40.0%), 1 ex/s, ETA 0:00:06, elapsed 0:00:52"
    now[0] = 80.0
    p.update(6)                      # the last update always logs
    assert seen == [2, 2, 6]
    assert lines[0] == "feat: 10 ex to do"
    assert lines[1].startswith("feat: 2/10 ex (20.0%), rate n/a")
    assert lines[2].startswith("feat: 10/10 ex (100.0%)") and len(lines) == 3


# ------------------------------------------------------------------------------ 2 processes
def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS",) and not k.startswith(("JAX_", "SLURM_", "TPU_",
                                                             "OMPI_", "MEGASCALE_"))}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The hook a test process runs instead of `python -m jaxattrib.launch`: process KILL_PROCESS
# SIGKILLs itself in the middle of its KILL_AT-th chunk write into a store folder named
# KILL_STORE, after the chunk's .npy is in place and before its .done flag (the worst moment).
KILL_HOOK = r'''
import os, runpy, signal, sys
if os.environ.get("JAX_PROCESS_ID") == os.environ["KILL_PROCESS"]:
    from jaxattrib.attribution import store
    writes = []

    def write_chunk(self, i, arr):
        if self.folder.name == os.environ["KILL_STORE"]:
            writes.append(i)
            if len(writes) == int(os.environ["KILL_AT"]):
                store._atomic_save_npy(self._paths(i)[0], arr.astype(self.dtype))
                print("KILLING MYSELF at chunk", i, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        return _orig(self, i, arr)

    _orig = store.ChunkedArray.write_chunk
    store.ChunkedArray.write_chunk = write_chunk
sys.argv = ["jaxattrib.launch"] + sys.argv[3:]   # drop "-m jaxattrib.launch"
runpy.run_module("jaxattrib.launch", run_name="__main__")
'''


def _local(args, cwd: Path, python: str, store: str = "train", timeout: int = 600):
    """``launch/local.sh ARGS`` on 2 processes x 2 CPU devices, with ``python`` (the kill hook
    wrapper or the plain interpreter)."""
    return subprocess.run(
        ["bash", str(ROOT / "launch" / "local.sh"), *args],
        env=_env(DEVICES_PER_PROCESS="2", PORT=str(_free_port()), PYTHON=python,
                 KILL_PROCESS="1", KILL_AT="2", KILL_STORE=store),
        cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _kill_hook(tmp_path: Path) -> str:
    hook = tmp_path / "hook.py"
    hook.write_text(KILL_HOOK)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {hook} \"$@\"\n")
    python.chmod(0o755)
    return str(python)


def test_featurize_two_processes_resume_after_kill(tmp_path):
    """Fast: the digits task (40 rows, chunks of 8: 0,2,4 to process 0, 1,3 to process 1) on 2
    processes x 2 devices; process 1 is SIGKILLed while writing chunk 3 (.npy in place, no
    .done); local.sh stops process 0 and exits 137; the rerun completes, and the store equals
    an uninterrupted 1-process run on 2 devices bit for bit (meta.json included)."""
    from jaxattrib import launch
    from jaxattrib.config import load_config
    out = tmp_path / "mh"
    args = ["featurize", "featurize_digits:tiny", "2", "--set", f"out_dir={out}",
            "--set", "featurize.chunk_size=8", "--no-progress"]
    killed = _local(args, tmp_path, _kill_hook(tmp_path), store="init")
    log = killed.stdout + killed.stderr
    assert killed.returncode == 137, log[-4000:]
    assert "KILLING MYSELF at chunk 3" in log and "status 137; stopping the others" in log
    st = out / "features" / "init"
    assert (st / "chunk_00001.done").exists()                # process 1's first chunk
    assert (st / "chunk_00003.npy").exists() and not (st / "chunk_00003.done").exists()
    done = _local(args, tmp_path, sys.executable)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "done on process 0" in log and "done on process 1" in log, log[-4000:]

    cfg = load_config("featurize_digits:tiny", [f"out_dir={tmp_path / 'ref'}",
                                                "num_devices=2", "featurize.chunk_size=8"])
    ref = launch.run_featurize(cfg, launch.make_launch_mesh(cfg), progress=False)
    assert (st / "meta.json").read_text() == (ref.folder / "meta.json").read_text()
    for i in range(5):
        np.testing.assert_array_equal(np.load(st / f"chunk_{i:05d}.npy"),
                                      np.load(ref.folder / f"chunk_{i:05d}.npy"))
    for p, name in ((0, "featurize.log"), (1, "featurize.process1.log")):
        lines = (out / "logs" / name).read_text().splitlines()
        assert all(STAMP.match(line) for line in lines), lines
        assert any(f"process {p}/2 computes {3 - p} chunk(s), {24 - 8 * p} examples, "
                   f"8 per microbatch on 2 device(s)" in line for line in lines), lines


@pytest.mark.slow
def test_attribute_on_two_processes_resumes_after_kill_and_equals_one(tiny_latent_pipeline,
                                                                      tmp_path):
    """Slow (~3 min on an idle 2-core machine; the fast twin is the digits test above).
    sd15_lora fine-tuned on 8 images of the tiny latent pipeline (VAE + UNet + CLIP, 16 px,
    8x8x4 latents). `launch/local.sh attribute` on
    2 processes x 2 CPU devices, chunks of 2 rows (4 train chunks, dealt 0,2 / 1,3): process 1
    is SIGKILLed while writing its 2nd chunk (its .npy in place, no .done), local.sh stops
    process 0 and exits 137. The rerun on 2 processes completes; the latent cache is
    bit-identical to an uninterrupted in-process run on 2 devices, features and scores equal to
    1e-6 (observed 2026-12-07: max 1.0e-7 on features of size ~0.2, in every chunk, the
    process-0-only query store included, so the float rounding comes from compiling in this
    8-device pytest process vs a 2-device subprocess, not from the split; the digits test above
    is bit-identical), and each process logged its own share to run/logs."""
    from jaxattrib.config import load_config
    from jaxattrib.runs.attribute import attribute_run
    from jaxattrib.runs.train import train_run

    data = write_pngs(tmp_path / "db" / "dog", 8, 0, size=16)
    (data / "prompt.txt").write_text("a red circle")
    queries = write_pngs(tmp_path / "q", 2, 5, size=16)
    (queries / "prompts.txt").write_text("a red circle\na blue square\n")
    cfg = load_config("sd15_lora", [
        f"model={tiny_latent_pipeline}", f"data.path={tmp_path / 'db'}", "data.size=16",
        "finetune.steps=2", "finetune.batch_size=4", "finetune.checkpoint_every=2",
        "attribution.k=16", "attribution.num_timesteps=2", "attribution.microbatch=2"])
    ref = tmp_path / "ref"
    train_run(cfg, ref, progress=False, mesh=parallel.make_mesh(1))
    mh = tmp_path / "mh"
    shutil.copytree(ref, mh)

    args = ["attribute", "sd15_lora", "2", "--set", f"out_dir={mh}", "--queries", str(queries),
            "--chunk-size", "2", "--no-progress"]  # k, params, ...: the run's, as the CLI's
    killed = _local(args, tmp_path, _kill_hook(tmp_path))
    log = killed.stdout + killed.stderr
    assert killed.returncode == 137, log[-4000:]
    assert "KILLING MYSELF at chunk 3" in log, log[-4000:]
    assert "status 137; stopping the others" in log, log[-4000:]
    train = mh / "features" / "dtrak" / "step_2" / "train"
    assert (train / "chunk_00001.done").exists()             # process 1's first chunk
    assert (train / "chunk_00003.npy").exists() and not (train / "chunk_00003.done").exists()
    assert not (mh / "scores").exists()

    done = _local(args, tmp_path, sys.executable)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "2 process(es), 4 device(s)" in log
    assert "done on process 0: scores (2, 8)" in log and "done on process 1" in log, log[-4000:]

    want = attribute_run(ref, queries, "dtrak", k=16, params="attn2", num_timesteps=2,
                         projection="sjlt", microbatch=2, chunk_size=2, progress=False,
                         mesh=parallel.make_mesh(2))
    got = np.load(mh / "scores" / "dtrak_q.npy")
    assert got.shape == (2, 8) and np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    for name in ("features/dtrak/step_2/train", "features/dtrak/step_2/queries_q",
                 "latents/train"):
        a, b = (r / name for r in (ref, mh))
        assert (b / "meta.json").read_text() == (a / "meta.json").read_text()
        assert sorted(f.name for f in b.glob("*")) == sorted(f.name for f in a.glob("*"))
        for f in a.glob("chunk_*.npy"):
            if name == "latents/train":
                np.testing.assert_array_equal(np.load(b / f.name), np.load(f))
            else:
                np.testing.assert_allclose(np.load(b / f.name), np.load(f), rtol=0, atol=1e-6)

    # each process logged its share: first launch (2 chunks each), rerun (what was missing)
    for p, name in ((0, "attribute.log"), (1, "attribute.process1.log")):
        lines = (mh / "logs" / name).read_text().splitlines()
        assert all(STAMP.match(line) for line in lines), lines
        assert any(f"process {p}/2 computes 2 chunk(s), 4 examples" in line
                   for line in lines), lines
        assert any(re.search(r"featurize train \[%d/2\]: 2/4 ex \(50.0%%\)" % p, line)
                   for line in lines), lines
    assert "scoring 2 queries against 8 training examples" in \
        (mh / "logs" / "attribute.log").read_text()
    assert "process 0 scores" in (mh / "logs" / "attribute.process1.log").read_text()
