"""Mesh construction, batch sharding, replication and multi-process start-up detection."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxattrib import parallel


def test_make_mesh_sizes():
    assert jax.device_count() == 8  # tests/conftest.py emulates 8 CPU devices
    m = parallel.make_mesh()
    assert m.shape == {"data": 8} and m.axis_names == ("data",)
    assert parallel.make_mesh(2).shape == {"data": 2}
    assert parallel.make_mesh(4, axis="batch").axis_names == ("batch",)
    with pytest.raises(ValueError, match="num_devices=9"):
        parallel.make_mesh(9)


def test_shard_batch_splits_leading_axis():
    mesh = parallel.make_mesh(8)
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    batch = parallel.shard_batch({"x": x, "y": np.arange(16)}, mesh)
    assert batch["x"].sharding.spec == P("data")
    shards = sorted(batch["x"].addressable_shards, key=lambda s: s.index[0].start)
    assert len(shards) == 8
    for i, s in enumerate(shards):  # device i holds rows [2i, 2i+2)
        np.testing.assert_array_equal(np.asarray(s.data), x[2 * i:2 * i + 2])
    np.testing.assert_array_equal(np.asarray(batch["y"]), np.arange(16))


def test_shard_batch_rejects_indivisible_batch():
    mesh = parallel.make_mesh(8)
    with pytest.raises(ValueError, match=r"\['x'\].*batch size 12.*8 devices"):
        parallel.shard_batch({"x": np.zeros((12, 2))}, mesh)
    with pytest.raises(ValueError, match="scalar"):
        parallel.shard_batch({"x": np.float32(1.0)}, mesh)


def test_replicate_and_global_sum():
    mesh = parallel.make_mesh(8)
    w = parallel.replicate({"w": jnp.arange(3.0)}, mesh)
    assert w["w"].sharding.is_fully_replicated
    assert len(w["w"].addressable_shards) == 8
    x = parallel.shard_batch(np.ones((8, 3), np.float32), mesh)
    # a jitted reduction over the sharded axis sees the whole global batch
    total = jax.jit(lambda w, x: jnp.sum(x @ w["w"]))(w, x)
    assert float(total) == 8 * 3.0


def test_host_local_to_global_matches_shard_batch_on_one_process():
    mesh = parallel.make_mesh(8)
    x = np.random.default_rng(0).normal(size=(8, 2, 2)).astype(np.float32)
    assert parallel.process_slice(8) == slice(0, 8)
    assert parallel.process_slice(8, process_index=1, process_count=4) == slice(2, 4)
    with pytest.raises(ValueError, match="not divisible"):
        parallel.process_slice(6, process_index=0, process_count=4)
    a = parallel.host_local_to_global({"x": x}, mesh)["x"]
    assert a.shape == (8, 2, 2) and a.sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(a), x)
    np.testing.assert_array_equal(parallel.global_to_host_local({"x": a})["x"], x)
    with pytest.raises(ValueError, match="not divisible"):
        parallel.host_local_to_global({"x": x[:4]}, mesh)


_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
        "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS")


def test_initialize_distributed_detection(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for v in _ENV:
        monkeypatch.delenv(v, raising=False)
    assert parallel.initialize_distributed() is False  # plain single process
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert parallel.initialize_distributed() is False  # one-task SLURM job
    assert calls == []
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parallel.initialize_distributed() is True  # JAX's own SLURM detection
    assert calls[-1] == {}
    assert parallel.initialize_distributed("10.0.0.1:1234", 2, 1) is True
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                         "process_id": 1}
    assert parallel.initialize_distributed("10.0.0.1:1234", 1, 0) is False
    for v in _ENV:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "a,b,c,d")
    assert parallel.initialize_distributed() is True and calls[-1] == {}
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    assert parallel.initialize_distributed() is False  # single-host TPU VM


MULTIHOST_SCRIPT = r'''
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import os

import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, out, tests_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
sys.path.insert(0, tests_dir)
from jaxattrib import parallel
assert parallel.initialize_distributed(f"localhost:{port}", 2, pid)
import numpy as np
from tiny import leaves as _leaves, toy_train_config as _cfg, toy_training
T = toy_training()
init_params, loss_fn, get_batch, N = T.init_params, T.loss_fn, T.get_batch, T.N
from jaxattrib.train.finetune import finetune
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
rows = []
def get(idx):
    rows.append(len(idx))
    return get_batch(idx)
params, rec = finetune(loss_fn, init_params(), N, get, _cfg(steps=6, checkpoint_every=3), out,
                       mesh=parallel.make_mesh(), progress=False)
np.savez(f"{out}_p{pid}.npz", *_leaves(parallel.global_to_host_local(params)))
assert set(rows) == {4}, rows  # each process loads its half of the global batch of 8
print("OK", pid)
'''


def test_two_process_training_matches_one_process(tmp_path):
    """2 processes x 2 CPU devices (jax.distributed, gloo) train like 1 process x 4 devices;
    the record they write is readable here, on a different device topology (8 devices)."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from jaxattrib.train.finetune import finetune
    from jaxattrib.train.record import TrajectoryRecord
    from tiny import leaves as _leaves, toy_train_config as _cfg, toy_training
    T = toy_training()
    init_params, loss_fn, get_batch, N = T.init_params, T.loss_fn, T.get_batch, T.N

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "mh.py"
    script.write_text(MULTIHOST_SCRIPT)
    out = tmp_path / "rec"
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(root)
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(out),
                               str(root / "tests")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for i, log in enumerate(logs):
        assert f"OK {i}" in log, log[-3000:]
    ref, _ = finetune(loss_fn, init_params(), N, get_batch, _cfg(steps=6, checkpoint_every=3),
                      tmp_path / "ref", mesh=parallel.make_mesh(4), progress=False)
    for i in (0, 1):
        got = np.load(f"{out}_p{i}.npz")
        for j, a in enumerate(_leaves(ref)):
            np.testing.assert_allclose(got[f"arr_{j}"], a, rtol=0, atol=1e-6)
    rec = TrajectoryRecord.open(out)
    assert rec.steps() == [0, 3, 6] and rec.logged_steps() == list(range(6))
    for a, b in zip(_leaves(rec.load(6)), _leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
