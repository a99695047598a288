"""Launch at pod scale: 2 real jax.distributed processes, the launch scripts' dry runs, and the
launcher's featurization on 8 emulated devices vs 1."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattrib import launch
from jaxattrib.attribution.grads import select_params
from jaxattrib.attribution.projection import make_projector
from jaxattrib.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = "featurize_digits:tiny"  # 40 digits, MLP 64-16-10, k=32, 3 chunks of <= 16 rows


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS",) and not k.startswith(("JAX_", "SLURM_", "TPU_",
                                                             "OMPI_", "MEGASCALE_"))}
    env.update(PYTHONPATH=str(ROOT), PYTHON=sys.executable, **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _features(folder: Path) -> np.ndarray:
    meta = json.loads((folder / "meta.json").read_text())
    n_chunks = -(-meta["n_rows"] // meta["chunk_size"])
    assert all((folder / f"chunk_{i:05d}.done").exists() for i in range(n_chunks))
    assert not list(folder.glob(".*.tmp")), "temp files left behind"
    return np.concatenate([np.load(folder / f"chunk_{i:05d}.npy") for i in range(n_chunks)])


def _reference(tmp_path, num_devices: int = 1) -> tuple[np.ndarray, Path]:
    cfg = load_config(TINY, [f"out_dir={tmp_path / 'ref'}", f"num_devices={num_devices}"])
    store = launch.run_featurize(cfg, launch.make_launch_mesh(cfg), progress=False)
    return store.read_all(), store.folder


@pytest.mark.slow  # fast cover: test_scaling.py::test_featurize_two_processes_resume_after_kill
def test_two_processes_featurize_like_one(tmp_path):
    """launch/local.sh: 2 jax.distributed processes x 2 CPU devices (loopback, gloo) write
    the same store as 1 process on 1 device (observed bit-identical; asserted to 1e-6)."""
    out = tmp_path / "mh"
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "local.sh"), "featurize", TINY, "2", "--set",
         f"out_dir={out}", "--set", "num_devices=0"],
        env=_env(DEVICES_PER_PROCESS="2", PORT=str(_free_port())), cwd=tmp_path,
        capture_output=True, text=True, timeout=600)  # 260 s seen on a 2-core box at load ~25
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "2 process(es), 4 device(s), mesh {'data': 4}" in log, log[-3000:]
    assert "done on process 0" in log and "done on process 1" in log, log[-3000:]
    got = _features(out / "features" / "init")
    ref, ref_folder = _reference(tmp_path)
    assert got.shape == (40, 32) and np.abs(ref).max() > 0.1
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    # same metadata (projector, dataset fingerprint, ...) => the stores are interchangeable
    assert (out / "features" / "init" / "meta.json").read_text() == \
        (ref_folder / "meta.json").read_text()


def _run(script, *args, **env):
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], env=_env(**env),
                          capture_output=True, text=True, timeout=120, cwd=str(ROOT))


def test_script_dry_runs_print_commands(tmp_path):
    out = str(tmp_path / "o")
    r = _run("local.sh", "--dry-run", "train", TINY, "3", "--set", f"out_dir={out}",
             PORT="23456", DEVICES_PER_PROCESS="2")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("env ")]
    assert len(lines) == 3
    for i, line in enumerate(lines):
        for part in ("JAX_COORDINATOR_ADDRESS=127.0.0.1:23456", "JAX_NUM_PROCESSES=3",
                     f"JAX_PROCESS_ID={i}", "--xla_force_host_platform_device_count=2",
                     f"-m jaxattrib.launch train {TINY} --set out_dir={out}"):
            assert part in line, line
    plan = json.loads(r.stdout[r.stdout.index("{"):r.stdout.index("}") + 1])
    assert plan["command"] == "train" and plan["n_examples"] == 40
    assert plan["record"] == str(Path(out).resolve() / "record")
    assert not Path(out).exists()  # a dry run writes nothing

    r = _run("tpu_pod.sh", "--dry-run", TINY, "--set", "featurize.k=16",
             TPU_NAME="pod-a", ZONE="us-central2-b", REMOTE_DIR="/opt/jaxattrib")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == (
        "gcloud compute tpus tpu-vm ssh pod-a --zone us-central2-b --worker=all --command "
        "'cd /opt/jaxattrib && PYTHONPATH=. .venv/bin/python -m jaxattrib.launch featurize "
        f"{TINY} --set featurize.k=16 --distributed on'")
    r = _run("tpu_pod.sh", "--dry-run", TINY, ZONE="z")
    assert r.returncode == 2 and "set TPU_NAME" in r.stderr

    r = _run("slurm_gpu.sbatch", "--dry-run", "featurize", TINY, MODE="per-node",
             GPUS_PER_NODE="4", SLURM_JOB_NUM_NODES="2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].split() == [
        "srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", sys.executable,
        "-m", "jaxattrib.launch", "featurize", TINY, "--no-progress", "--local-device-ids",
        r"0\,1\,2\,3"]


BROKEN = '''
from jaxattrib.configs.featurize_digits import get_config as base

def get_config(arg=None):
    c = base("tiny")
    del c.featurize["k"]
    return c
'''


def test_broken_configs_fail_clearly(tmp_path, capsys):
    bad = tmp_path / "broken.py"
    bad.write_text(BROKEN)
    # through a script: nothing is printed or launched, exit status 2, the field is named
    r = _run("tpu_pod.sh", "--dry-run", str(bad), TPU_NAME="pod-a", ZONE="z")
    assert r.returncode == 2
    assert "missing required field(s) ['featurize.k']" in r.stderr
    assert "gcloud" not in r.stdout
    # in process: each kind of error names what is wrong
    cases = [
        ([str(bad)], "missing required field(s) ['featurize.k']"),
        ([TINY, "--set", "featurize.projection=gauss"], "featurize.projection='gauss'"),
        ([TINY, "--set", "featurize.microbatch=0"], "featurize.microbatch=0"),
        ([TINY, "--set", "featurize.params=latest"], "featurize.params='latest'"),
        ([TINY, "--set", "task=imagenet"], "task='imagenet'"),
        ([TINY, "--set", "data.digits=(12,)"], "digits: [12] are not digits"),
        ([TINY, "--set", "featurize.kk=3"], "has no field 'featurize.kk'"),
        (["no_such_config"], "no such file"),
    ]
    for args, message in cases:
        assert launch.main(["featurize", *args, "--dry-run"]) == 2, args
        err = capsys.readouterr().err
        assert "invalid config" in err and message in err, (args, err)
    assert launch.main(["train", TINY, "--set", "train.batch_size=64", "--dry-run"]) == 2
    assert "train.batch_size=64 > 40 examples" in capsys.readouterr().err


def test_launcher_featurize_8_devices_equals_1(tmp_path, capsys):
    """`python -m jaxattrib.launch featurize` in this process on all 8 emulated devices vs 1
    device: equal to 1e-5 absolute (float32 features of size <= ~3.5; the per-device batch
    changes XLA's reduction order: observed max difference 1.6e-6); and rows equal per-example
    margin gradients projected by hand."""
    assert jax.device_count() == 8
    out = tmp_path / "eight"
    assert launch.main(["featurize", TINY, "--set", f"out_dir={out}", "--distributed", "off",
                        "--no-progress"]) == 0
    assert "mesh {'data': 8}" in capsys.readouterr().out
    got = _features(out / "features" / "init")
    ref, _ = _reference(tmp_path, num_devices=1)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)

    # ground truth for two rows: P^T grad_theta margin(z_i)
    cfg = load_config(TINY)
    task = launch._TASKS[cfg.task][1](cfg)
    params = select_params(task.init_params, "all").trainable
    proj = make_projector("rademacher", 32, 0, params)
    for i in (0, 39):
        ex = jax.tree.map(lambda a: jnp.asarray(a[i]), task.examples)
        g = jax.grad(task.out_fn)(params, ex, jax.random.PRNGKey(0))
        want = np.asarray(proj.project(jax.tree.map(lambda x: x[None], g)))[0]
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)
    # a rerun finds the store complete and leaves it unchanged
    assert launch.main(["featurize", TINY, "--set", f"out_dir={out}", "--distributed", "off",
                        "--no-progress"]) == 0
    np.testing.assert_array_equal(_features(out / "features" / "init"), got)


ROWS_SCRIPT = r'''
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
from jaxattrib import parallel
assert parallel.initialize_distributed(f"127.0.0.1:{port}", 2, pid)
import numpy as np
import pytest
from jaxattrib.attribution import grads as gr


class Recording:
    """An array-like leaf that records which rows are read."""
    def __init__(self, a):
        self.a, self.shape, self.rows = a, a.shape, set()

    def __getitem__(self, idx):
        self.rows.update(np.atleast_1d(np.arange(len(self.a))[idx]).tolist())
        return self.a[idx]


x = Recording(np.arange(16 * 3, dtype=np.float32).reshape(16, 3))
fn = jax.jit(lambda ex, keys: ex["x"] * 2.0 + jax.random.key_data(keys)[:, :1] * 0)
feats = gr.projected_grads(fn, {"x": x}, jax.random.PRNGKey(0), microbatch=8,
                           mesh=parallel.make_mesh())
np.testing.assert_array_equal(feats, 2.0 * x.a)  # every process gets all rows back
print("ROWS", pid, sorted(x.rows), flush=True)
'''


@pytest.mark.slow
def test_each_process_reads_only_its_devices_rows(tmp_path):
    """2 processes x 2 devices, microbatch 8: process p reads rows [4p, 4p+4) of each
    microbatch (its devices' shards) and nothing else, and gets the full result."""
    script = tmp_path / "rows.py"
    script.write_text(ROWS_SCRIPT)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(i), port, str(tmp_path / "o")],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in (0, 1)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    want = {0: [0, 1, 2, 3, 8, 9, 10, 11], 1: [4, 5, 6, 7, 12, 13, 14, 15]}
    for i, log in enumerate(logs):
        assert f"ROWS {i} {want[i]}" in log, log[-3000:]
