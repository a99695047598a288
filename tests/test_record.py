"""The trajectory record: manifest checks, checkpoint safety, step log, parameter composition."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxattrib.models import lora
from jaxattrib.train.record import (RecordError, RecordMismatchError, TrajectoryRecord,
                                    _read_steps_file, dataset_fingerprint)


def _manifest(**kw):
    m = {"config": {"mode": "full", "lr": 1e-3, "steps": 4}, "seed": 0,
         "model": {"name": "toy"}, "dataset": {"size": 5, "fingerprint": "abc"}}
    m.update(kw)
    return m


def _params(seed=0):
    k = jax.random.PRNGKey(seed)
    return {"unet": {"attn1": {"to_q": {"kernel": jax.random.normal(k, (3, 4)),
                                        "bias": jnp.zeros(4)}}},
            "vae": {"w": jnp.arange(3.0)}}


def _state(trainable, step):
    opt = optax.adam(1e-3)
    return {"step": jnp.int32(step), "params": trainable, "opt_state": opt.init(trainable)}


def test_manifest_written_and_checked(tmp_path):
    d = tmp_path / "rec"
    rec = TrajectoryRecord.create(d, _manifest(seed=np.int64(3)))
    on_disk = json.loads((d / "manifest.json").read_text())
    assert on_disk["seed"] == 3 and on_disk["format"].startswith("jaxattrib")
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]  # atomic write left nothing
    rec.close()
    TrajectoryRecord.create(d, _manifest(seed=3)).close()  # same manifest: reopens
    with pytest.raises(RecordMismatchError, match="'model.name'.*'toy'.*'other'"):
        TrajectoryRecord.create(d, _manifest(seed=3, model={"name": "other"}))
    with pytest.raises(RecordMismatchError, match="dataset.fingerprint"):
        TrajectoryRecord.open(d, expect={"dataset": {"size": 5, "fingerprint": "xyz"}})
    assert TrajectoryRecord.open(d, expect={"seed": 3}).manifest["seed"] == 3
    with pytest.raises(RecordError, match="not a trajectory record"):
        TrajectoryRecord.open(tmp_path / "nothing")


def test_checkpoints_never_overwritten_and_load_composes_full_mode(tmp_path):
    base = _params()
    rec = TrajectoryRecord.create(tmp_path / "r", _manifest())
    with pytest.raises(RecordError, match="step 0"):
        rec.save(0, _state({"unet": base["unet"]}, 0))  # step 0 needs the base
    rec.save(0, _state({"unet": base["unet"]}, 0), base=base)
    moved = jax.tree.map(lambda x: x + 1.0, {"unet": base["unet"]})
    rec.save(2, _state(moved, 2))
    rec.wait()
    with pytest.raises(RecordError, match="exists"):
        rec.save(2, _state({"unet": base["unet"]}, 2))
    # an unfinished orbax write (temporary folder) is not a checkpoint
    (tmp_path / "r" / "checkpoints" / "3.orbax-checkpoint-tmp-1234").mkdir()
    rec.close()
    ro = TrajectoryRecord.open(tmp_path / "r")
    assert ro.steps() == [0, 2]
    with pytest.raises(RecordError, match="read-only"):
        ro.append_step({"step": 0, "indices": [0], "key": [0, 0], "lr": 0.1})
    p2 = ro.load(2)
    np.testing.assert_array_equal(p2["unet"]["attn1"]["to_q"]["kernel"],
                                  np.asarray(base["unet"]["attn1"]["to_q"]["kernel"]) + 1)
    np.testing.assert_array_equal(p2["vae"]["w"], np.arange(3.0))  # frozen part from base
    np.testing.assert_array_equal(ro.load(0)["unet"]["attn1"]["to_q"]["kernel"],
                                  base["unet"]["attn1"]["to_q"]["kernel"])
    assert [s for s, _ in ro.iterate()] == [0, 2]
    tmpl = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float16), base)
    assert ro.load(2, template=tmpl)["unet"]["attn1"]["to_q"]["kernel"].dtype == jnp.float16
    with pytest.raises(RecordError, match="no checkpoint for step 1"):
        ro.load(1)
    st = ro.load_train_state(2, template=_state(moved, 0))
    assert int(st["step"]) == 2 and isinstance(st["opt_state"][0], optax.ScaleByAdamState)


def test_load_composes_lora_mode(tmp_path):
    base = _params()
    lp = lora.lora_init({"unet": base["unet"]}, jax.random.PRNGKey(1), 2)
    lp["unet"]["attn1"]["to_q"]["kernel"]["b"] = jnp.ones((2, 4))
    rec = TrajectoryRecord.create(tmp_path / "r", _manifest(
        config={"mode": "lora", "lora_alpha": 6.0}))
    rec.save(0, _state(lp, 0), base=base)
    rec.save(1, _state(lp, 1))
    rec.close()
    p = TrajectoryRecord.open(tmp_path / "r").load(1)
    a = np.asarray(lp["unet"]["attn1"]["to_q"]["kernel"]["a"])
    expected = np.asarray(base["unet"]["attn1"]["to_q"]["kernel"]) + 3.0 * a @ np.ones((2, 4))
    np.testing.assert_allclose(p["unet"]["attn1"]["to_q"]["kernel"], expected, rtol=1e-6)


def test_step_log_torn_line_and_truncation(tmp_path):
    rec = TrajectoryRecord.create(tmp_path / "r", _manifest())
    for s in range(4):
        rec.append_step({"step": s, "lr": 0.1 * s, "indices": np.array([s, s + 1]),
                         "key": np.array([0, s], np.uint32), "timesteps": np.array([7, s])})
    path = tmp_path / "r" / "steps.jsonl"
    with open(path, "ab") as f:  # a process killed in the middle of a write
        f.write(b'{"step": 4, "lr": 0.4, "ind')
    assert rec.logged_steps() == [0, 1, 2, 3]
    info = rec.step_info(2)
    np.testing.assert_array_equal(info["indices"], [2, 3])
    assert info["key"].dtype == np.uint32 and info["lr"] == pytest.approx(0.2)
    np.testing.assert_array_equal(info["timesteps"], [7, 2])
    batch, key = rec.replay_batch(2, {"x": np.arange(10) * 10})
    np.testing.assert_array_equal(batch["x"], [20, 30])
    np.testing.assert_array_equal(np.asarray(key), [0, 2])
    with pytest.raises(RecordError, match="no entry for step 9"):
        rec.step_info(9)
    rec.truncate_steps(2)  # resume from checkpoint 2: keep updates 0 and 1
    assert [r["step"] for r in _read_steps_file(path)] == [0, 1]
    assert path.read_text().endswith("\n")
    rec.append_step({"step": 2, "lr": 0.2, "indices": [2, 3], "key": [0, 2]})
    assert rec.logged_steps() == [0, 1, 2]
    # a log that skips a step cannot be resumed consistently
    rec.append_step({"step": 5, "lr": 0.2, "indices": [2, 3], "key": [0, 2]})
    with pytest.raises(RecordError, match="not contiguous"):
        rec.truncate_steps(10)
    rec.close()


def test_dataset_fingerprint_changes_with_content():
    x = {"images": np.zeros((2, 3), np.float32), "ids": np.arange(2)}
    f = dataset_fingerprint(x)
    assert f == dataset_fingerprint({"ids": np.arange(2), "images": np.zeros((2, 3), np.float32)})
    y = {"images": np.zeros((2, 3), np.float32), "ids": np.array([0, 2])}
    assert dataset_fingerprint(y) != f
    assert dataset_fingerprint({**x, "images": x["images"].astype(np.float64)}) != f
    assert dataset_fingerprint(["a.png", "b.png"]) != dataset_fingerprint(["b.png", "a.png"])


def _flip_byte(path, offset=-2):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def _largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_corrupt_checkpoint_is_a_clear_error_naming_the_step(tmp_path):
    from jaxattrib import integrity
    from jaxattrib.models.convert import CheckpointError
    from jaxattrib.train.record import CorruptCheckpointError
    base = _params()
    d = tmp_path / "r"
    rec = TrajectoryRecord.create(d, _manifest())
    rec.save(0, _state({"unet": base["unet"]}, 0), base=base)
    for s in (1, 2):
        rec.save(s, _state(jax.tree.map(lambda x: x + s, {"unet": base["unet"]}), s))
    rec.close()
    listed = json.loads((d / "checksums" / "1.json").read_text())["files"]
    assert sorted(listed) == sorted(p.relative_to(d / "checkpoints" / "1").as_posix()
                                    for p in (d / "checkpoints" / "1").rglob("*") if p.is_file())
    r = TrajectoryRecord.open(d)
    assert r.verify_step(1)
    want = r.load_train_state(1)["params"]
    _flip_byte(_largest_file(d / "checkpoints" / "1" / "train"))
    integrity._verified.clear()                         # as a new process would
    with pytest.raises(CorruptCheckpointError) as err:
        r.load_train_state(1)
    msg = str(err.value)
    assert "step 1 is corrupt" in msg and "checkpoints/1" in msg
    assert "resumes from checkpoint 0" in msg and "[1, 2]" in msg
    assert isinstance(err.value, CheckpointError) and isinstance(err.value, RecordError)
    r.load_train_state(2)                               # other steps still load
    # recovery as the message says: delete steps 1.. and re-save them (as a resumed run does)
    import shutil
    for s in (1, 2):
        shutil.rmtree(d / "checkpoints" / str(s))
    rec = TrajectoryRecord.create(d, _manifest())
    assert rec.steps() == [0]
    rec.save(1, _state(jax.tree.map(lambda x: x + 1, {"unet": base["unet"]}), 1))
    rec.close()
    got = TrajectoryRecord.open(d).load_train_state(1)["params"]
    jax.tree.map(np.testing.assert_array_equal, got, want)
    # a corrupt step 0 names the record directory as the way out
    _flip_byte(_largest_file(d / "checkpoints" / "0" / "base"))
    integrity._verified.clear()
    with pytest.raises(CorruptCheckpointError, match="step 0 .*delete the record directory"):
        TrajectoryRecord.open(d).load(1)


def test_record_without_checksums_loads_and_reopening_fills_them(tmp_path, caplog):
    import shutil
    base = _params()
    d = tmp_path / "r"
    rec = TrajectoryRecord.create(d, _manifest())
    rec.save(0, _state({"unet": base["unet"]}, 0), base=base)
    rec.close()
    shutil.rmtree(d / "checksums")                      # a record from before checksums
    r = TrajectoryRecord.open(d)
    assert not r.verify_step(0)
    r.load(0)
    r.load(0)
    assert caplog.text.count("loaded unverified") == 1   # one notice per record
    TrajectoryRecord.create(d, _manifest()).close()     # reopening for writing fills them in
    assert TrajectoryRecord.open(d).verify_step(0)


def test_record_accepts_relative_path(tmp_path, monkeypatch):
    from jaxattrib.train.record import TrajectoryRecord
    monkeypatch.chdir(tmp_path)
    rec = TrajectoryRecord.create("rel/record", {"config": {"a": 1}})
    rec.save(0, {"params": {"w": np.ones(3, np.float32)}}, base={"w": np.ones(3, np.float32)})
    rec.wait()
    rec.close()
    assert TrajectoryRecord.open(Path("rel/record")).steps() == [0]
