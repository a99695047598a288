"""Chunked store: chunk bookkeeping, atomic writes, reads, metadata validation on reopen."""

import json
import os

import numpy as np
import pytest

from jaxattrib.attribution.store import (ChunkedArray, StoreMismatchError, dataset_fingerprint,
                                         feature_meta)


def _meta(**over):
    kw = dict(projector_meta={"kind": "gaussian", "k": 8, "key": [0, 1]}, seed=1,
              output_fn="dsm_loss", dataset_fingerprint="abc", timesteps=(0, 100),
              checkpoint_steps=[10])
    kw.update(over)
    return feature_meta(**kw)


def test_chunks_write_read_and_missing(tmp_path):
    st = ChunkedArray.open(tmp_path / "train", n_rows=10, n_cols=3, chunk_size=4, meta=_meta())
    assert st.n_chunks == 3 and st.missing_chunks() == [0, 1, 2]
    assert st.chunk_range(2) == (8, 10)
    data = np.arange(30, dtype=np.float32).reshape(10, 3)
    st.write_chunk(1, data[4:8])
    assert st.missing_chunks() == [0, 2] and st.is_done(1)
    with pytest.raises(FileNotFoundError, match="not written"):
        st.read_all()
    with pytest.raises(ValueError, match="shape"):
        st.write_chunk(2, data[:4])
    st.write_chunk(0, data[:4])
    st.write_chunk(2, data[8:])
    assert st.complete()
    np.testing.assert_array_equal(st.read_all(), data)
    np.testing.assert_array_equal(st.read_rows(3, 9), data[3:9])
    mm = st.read_all(mmap=True)
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    np.testing.assert_array_equal(mm, data)
    # rewriting a chunk invalidates the consolidated copy
    st.write_chunk(0, data[:4] + 1)
    assert not (tmp_path / "train" / "all.npy").exists()
    np.testing.assert_array_equal(st.read_all(mmap=True)[:4], data[:4] + 1)
    # no temp files left behind
    assert not [p for p in os.listdir(tmp_path / "train") if p.endswith(".tmp")]


def test_interrupted_chunk_is_not_done(tmp_path):
    st = ChunkedArray.open(tmp_path, n_rows=4, n_cols=2, chunk_size=2)
    st.write_chunk(0, np.ones((2, 2)))
    # a chunk file without its done flag (killed between the two renames) is redone,
    # and a stray temp file is ignored
    (tmp_path / "chunk_00000.done").unlink()
    (tmp_path / ".chunk_00001.npy.xyz.tmp").write_bytes(b"partial")
    reopened = ChunkedArray.open(tmp_path, n_rows=4, n_cols=2, chunk_size=2)
    assert reopened.missing_chunks() == [0, 1]


def test_reopen_same_metadata_keeps_chunks(tmp_path):
    st = ChunkedArray.open(tmp_path, n_rows=4, n_cols=8, chunk_size=2, meta=_meta())
    st.write_chunk(1, np.ones((2, 8)))
    again = ChunkedArray.open(tmp_path, n_rows=4, n_cols=8, chunk_size=2, meta=_meta())
    assert again.missing_chunks() == [0]
    assert json.loads((tmp_path / "meta.json").read_text())["meta"]["timesteps"] == [0, 100]


@pytest.mark.parametrize("change,field,stored,requested", [
    (dict(seed=2), "seed", 1, 2),
    (dict(output_fn="l2_norm"), "output_fn", "dsm_loss", "l2_norm"),
    (dict(dataset_fingerprint="xyz"), "dataset_fingerprint", "abc", "xyz"),
    (dict(timesteps=[0, 50]), "timesteps", [0, 100], [0, 50]),
    (dict(checkpoint_steps=[20]), "checkpoint_steps", [10], [20]),
])
def test_reopen_with_different_metadata_is_refused(tmp_path, change, field, stored, requested):
    ChunkedArray.open(tmp_path, n_rows=4, n_cols=8, chunk_size=2, meta=_meta())
    with pytest.raises(StoreMismatchError) as err:
        ChunkedArray.open(tmp_path, n_rows=4, n_cols=8, chunk_size=2, meta=_meta(**change))
    assert err.value.mismatches == {field: (stored, requested)}
    assert field in str(err.value) and repr(stored) in str(err.value)


def test_reopen_with_different_k_and_shape_names_every_field(tmp_path):
    ChunkedArray.open(tmp_path, n_rows=4, n_cols=8, chunk_size=2, meta=_meta())
    proj16 = {"kind": "gaussian", "k": 16, "key": [0, 1]}
    with pytest.raises(StoreMismatchError) as err:
        ChunkedArray.open(tmp_path, n_rows=5, n_cols=16, chunk_size=2,
                          meta=_meta(projector_meta=proj16, seed=3))
    mm = err.value.mismatches
    assert mm["k"] == (8, 16) and mm["n_cols"] == (8, 16) and mm["n_rows"] == (4, 5)
    assert mm["seed"] == (1, 3) and mm["projector"][0]["k"] == 8
    assert set(mm) == {"k", "n_cols", "n_rows", "seed", "projector"}
    with pytest.raises(StoreMismatchError, match="dtype"):
        ChunkedArray.open(tmp_path, n_rows=4, n_cols=8, chunk_size=2, dtype="float16",
                          meta=_meta())


def test_train_and_query_subfolders_are_independent(tmp_path):
    train = ChunkedArray.open(tmp_path / "train", n_rows=4, n_cols=8, chunk_size=4, meta=_meta())
    train.write_chunk(0, np.zeros((4, 8)))
    q1 = ChunkedArray.open(tmp_path / "queries" / "a", n_rows=2, n_cols=8, chunk_size=2,
                           meta=_meta(dataset_fingerprint="qa"))
    q2 = ChunkedArray.open(tmp_path / "queries" / "b", n_rows=3, n_cols=8, chunk_size=2,
                           meta=_meta(dataset_fingerprint="qb"))
    assert q1.missing_chunks() == [0] and q2.missing_chunks() == [0, 1] and train.complete()


def test_dataset_fingerprint():
    a = {"x": np.arange(6).reshape(2, 3), "y": np.ones(2)}
    assert dataset_fingerprint(a) == dataset_fingerprint({k: v.copy() for k, v in a.items()})
    b = {"x": np.arange(6).reshape(3, 2), "y": np.ones(2)}
    c = {"x": np.arange(6).reshape(2, 3), "y": np.ones(2, np.float32)}
    d = {"x": np.arange(6).reshape(2, 3), "y": np.array([1.0, 2.0])}
    assert len({dataset_fingerprint(t) for t in (a, b, c, d)}) == 4


def _flip_byte(path, offset=-3):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def test_corrupt_chunk_is_detected_and_recomputed(tmp_path, caplog):
    """A chunk whose bytes no longer match its recorded SHA-256 is marked not done (a notice:
    WARNING on the jaxattrib.integrity logger), so featurize recomputes it; the result equals the uncorrupted one."""
    data = np.arange(30, dtype=np.float32).reshape(10, 3)
    st = ChunkedArray.open(tmp_path / "s", n_rows=10, n_cols=3, chunk_size=4)
    for i in range(st.n_chunks):
        st.write_chunk(i, data[slice(*st.chunk_range(i))])
    assert (tmp_path / "s" / "chunk_00001.done").read_text().startswith("sha256 ")
    np.testing.assert_array_equal(st.read_all(mmap=True), data)
    _flip_byte(tmp_path / "s" / "chunk_00001.npy")     # a data byte (the last row's)
    # a fresh process (cache cleared) opening the store sees the corruption
    from jaxattrib import integrity
    integrity._verified.clear()
    again = ChunkedArray.open(tmp_path / "s", n_rows=10, n_cols=3, chunk_size=4)
    assert again.missing_chunks() == [1]
    err = caplog.text
    assert "chunk_00001.npy: checksum mismatch" in err and "recomputed" in err
    assert not (tmp_path / "s" / "all.npy").exists()   # the consolidated copy is dropped too
    with pytest.raises(FileNotFoundError, match="chunk 1"):
        again.read_chunk(1)
    for i in again.missing_chunks():           # what featurize does with missing chunks
        again.write_chunk(i, data[slice(*again.chunk_range(i))])
    integrity._verified.clear()
    assert ChunkedArray.open(tmp_path / "s", n_rows=10, n_cols=3, chunk_size=4).complete()
    np.testing.assert_array_equal(again.read_all(mmap=True), data)


def test_corrupt_consolidated_copy_is_rebuilt(tmp_path, caplog):
    from jaxattrib import integrity
    data = np.arange(12, dtype=np.float32).reshape(4, 3)
    st = ChunkedArray.open(tmp_path, n_rows=4, n_cols=3, chunk_size=2)
    st.write_chunk(0, data[:2])
    st.write_chunk(1, data[2:])
    st.read_all(mmap=True)
    _flip_byte(tmp_path / "all.npy")
    integrity._verified.clear()
    np.testing.assert_array_equal(st.read_all(mmap=True), data)
    assert "all.npy: checksum mismatch" in caplog.text


def test_store_without_checksums_still_loads(tmp_path):
    """Stores written before checksums (empty done flags) load unverified, silently."""
    data = np.ones((4, 2), np.float32)
    st = ChunkedArray.open(tmp_path, n_rows=4, n_cols=2, chunk_size=2)
    st.write_chunk(0, data[:2])
    st.write_chunk(1, data[2:])
    for i in range(2):
        (tmp_path / f"chunk_{i:05d}.done").write_bytes(b"")
    again = ChunkedArray.open(tmp_path, n_rows=4, n_cols=2, chunk_size=2)
    assert again.complete()
    np.testing.assert_array_equal(again.read_all(), data)
