"""Streamed training data (docs/data.md): run directories reference their data with a
fingerprint instead of copying pixels; sources read rows on demand; old runs keep resuming."""

import json
import shutil

import numpy as np
import pytest

from jaxattrib.config import apply_overrides, load_config
from jaxattrib.data import source as S
from jaxattrib.data.dataset import DataError
from jaxattrib.data.run_data import DataChangedError, open_run_data


def _folder(root, n_per=4, size=10, seed=0):
    """root/dog, root/cat with random RGB PNGs (sizes differ, so resizing is exercised)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for si, subject in enumerate(("dog", "cat")):
        (root / subject).mkdir(parents=True, exist_ok=True)
        for i in range(n_per):
            img = rng.integers(0, 256, (size + si, size + i, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / subject / f"{i:02d}.png")
    return root


# ----------------------------------------------------------------------------- sources

def test_sources_read_the_same_pixels_as_the_in_memory_loaders(tmp_path):
    from jaxattrib.data.digits import load_digits
    from jaxattrib.data.folder import load_folder
    from jaxattrib.data.synthetic import SyntheticConceptSpec, make_synthetic
    root = _folder(tmp_path / "f")
    spec = SyntheticConceptSpec(size=16, per_combination=2)
    pairs = [(S.FolderSource(root, 8), load_folder(root, 8)),
             (S.SyntheticSource(spec, 3), make_synthetic(spec, 3)),
             (S.DigitsSource(8, max_per_digit=2), load_digits(8, max_per_digit=2))]
    for src, ds in pairs:
        assert src.ids == ds.ids and src.captions == ds.captions, src.kind
        for k in ds.labels:
            np.testing.assert_array_equal(src.labels[k], ds.labels[k])
        idx = np.array([len(ds) - 1, 0, 2])
        np.testing.assert_array_equal(src.read(idx), ds.images[idx])        # any order
        np.testing.assert_array_equal(src.images[1:4], ds.images[1:4])      # lazy rows
        again = S.open_source(json.loads(json.dumps(src.describe())))        # by reference
        assert again.fingerprint() == src.fingerprint() and again.ids == src.ids
        sub = src.subset([3, 1])
        np.testing.assert_array_equal(sub.read([1, 0]), ds.images[[1, 3]])
        assert S.open_source(sub.describe()).fingerprint() == sub.fingerprint()
    mem = S.MemorySource(pairs[0][1])
    assert mem.fingerprint() == pairs[0][1].fingerprint()
    legacy = tmp_path / "train.npz"
    ds = pairs[1][1]
    np.savez(legacy, images=ds.images, captions=np.array(ds.captions), ids=np.array(ds.ids))
    assert S.NpzSource(legacy).fingerprint() == ds.fingerprint()  # what old manifests hold


def test_fingerprint_changes_when_the_data_change(tmp_path):
    from PIL import Image
    from jaxattrib.data.synthetic import SyntheticConceptSpec
    root = _folder(tmp_path / "f")
    before = S.FolderSource(root, 8).fingerprint()
    assert S.FolderSource(root, 8).fingerprint() == before                 # deterministic
    assert S.FolderSource(root, 6).fingerprint() != before                 # other pixels
    p = root / "cat" / "02.png"
    img = np.asarray(Image.open(p)).copy()
    img[0, 0, 0] ^= 1                                                      # one bit of one pixel
    Image.fromarray(img).save(p)
    assert S.FolderSource(root, 8).fingerprint() != before
    (root / "dog" / "prompt.txt").write_text("a photo of a sks dog")       # a caption
    assert len({S.FolderSource(root, 8).fingerprint(), before}) == 2
    spec = SyntheticConceptSpec(size=16, per_combination=1)
    assert S.SyntheticSource(spec, 0).fingerprint() != S.SyntheticSource(spec, 1).fingerprint()
    assert S.DigitsSource(8).fingerprint() != S.DigitsSource(8, resample="bilinear").fingerprint()


def test_tfds_source_streams_an_array_record_set_built_here(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from tiny import make_tiny_tfds
    from jaxattrib.data.tfds_source import load_tfds
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 9, 12, 3), dtype=np.uint8)
    caps = [f"a red circle {i}" for i in range(5)]
    name = make_tiny_tfds(tmp_path / "a", images, caps)
    src = S.TfdsSource(name, "train", tmp_path / "a", 8, caption_key="caption")
    ds = load_tfds(name, "train", tmp_path / "a", 8, caption_key="caption")
    assert src.ids == ds.ids and src.captions == ds.captions and sorted(src.captions) == caps
    np.testing.assert_array_equal(src.read([4, 0, 2]), ds.images[[4, 0, 2]])
    assert S.open_source(json.loads(json.dumps(src.describe()))).fingerprint() == \
        src.fingerprint()
    images[2, 0, 0, 1] ^= 1                                  # one bit of one stored image
    make_tiny_tfds(tmp_path / "b", images, caps)
    assert S.TfdsSource(name, "train", tmp_path / "b", 8,
                        caption_key="caption").fingerprint() != src.fingerprint()
    with pytest.raises(DataError, match="not found|not prepared"):
        S.TfdsSource("no_such_set", "train", tmp_path / "a", 8)


def test_iter_batches_shards_cover_every_index_once_in_order(tmp_path):
    from jaxattrib.data.synthetic import SyntheticConceptSpec
    src = S.SyntheticSource(SyntheticConceptSpec(size=16, per_combination=1), 0)   # 60 examples
    order = np.random.default_rng(0).permutation(len(src))
    seen = []
    for shard in range(3):
        for b in S.iter_batches(src, 7, indices=order, shard_index=shard, shard_count=3):
            np.testing.assert_array_equal(b["images"], src.read(b["indices"]))
            assert b["ids"] == tuple(src.ids[i] for i in b["indices"])
            seen += b["indices"].tolist()
    assert seen == order.tolist()
    assert [S.shard_range(10, i, 3) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(DataError, match="out of range"):
        src.read([len(src)])


# ----------------------------------------------------------------------------- run directories

def _config(pipe, **data):
    sets = [f"model='{pipe}'", "data.size=8", "data.max_examples=0", "finetune.steps=2",
            "finetune.batch_size=4", "finetune.checkpoint_every=1"]
    sets += [f"data.{k}={v!r}" if isinstance(v, str) else f"data.{k}={v}"
             for k, v in data.items()]
    return load_config("finetune_folder", sets)


def _final(run):
    from jaxattrib.train.record import TrajectoryRecord
    rec = TrajectoryRecord.open((run / "record").resolve())
    try:
        return rec.load(rec.steps()[-1]), (run / "record" / "steps.jsonl").read_text()
    finally:
        rec.close()


def _assert_same_tree(a, b):
    import jax
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_run_dir_holds_no_pixels_streams_bit_exact_and_old_runs_resume(tiny_pixel_pipeline,
                                                                       tmp_path):
    """Streamed fine-tuning from a folder equals fine-tuning on the in-memory pixels (an old
    run directory with data/train.npz, written as the old code did) bit for bit; the old run
    resumes after losing its last checkpoint; a changed folder is refused on resume."""
    from jaxattrib.data.folder import load_folder
    from jaxattrib.runs.train import train_run
    root = _folder(tmp_path / "data")
    cfg = _config(tiny_pixel_pipeline, source="folder", path=str(root))
    run = tmp_path / "stream"
    train_run(cfg, run, progress=False)[1].close()
    # the run directory references the data: no pixel copy anywhere in it
    assert sorted(p.name for p in (run / "data").iterdir()) == ["source.json"]
    ref = json.loads((run / "data" / "source.json").read_text())
    assert ref["kind"] == "folder" and ref["root"] == str(root.resolve()) and ref["n"] == 8
    assert not list(run.rglob("*.npz")) and not list(run.rglob("*.npy"))
    manifest = json.loads((run / "record" / "manifest.json").read_text())
    assert manifest["dataset"]["fingerprint"] == ref["fingerprint"]
    assert manifest["dataset"]["ids"] == list(S.FolderSource(root, 8).ids)

    # an old run directory: config.json without the new data fields, pixels in data/train.npz
    ds = load_folder(root, 8)
    old = tmp_path / "old"
    (old / "data").mkdir(parents=True)
    np.savez(old / "data" / "train.npz", images=ds.images, captions=np.array(ds.captions),
             ids=np.array(ds.ids))
    stored = json.loads(cfg.to_json())
    for k in ("name", "split", "caption_key"):
        del stored["data"][k]
    (old / "config.json").write_text(json.dumps(stored))
    train_run(cfg, old, progress=False)[1].close()
    assert json.loads((old / "record" / "manifest.json").read_text())["dataset"] == \
        {"size": 8, "fingerprint": ds.fingerprint(), "ids": list(ds.ids)}  # as the old code
    p_stream, log_stream = _final(run)
    p_old, log_old = _final(old)
    assert log_stream == log_old                 # same examples, keys, lrs at every step
    _assert_same_tree(p_stream, p_old)           # streamed == in memory, bit for bit
    shutil.rmtree(old / "record" / "checkpoints" / "2")   # resume the old run from step 1
    train_run(cfg, old, progress=False)[1].close()
    p_again, log_again = _final(old)
    assert log_again == log_old
    _assert_same_tree(p_again, p_old)
    assert open_run_data(old).kind == "npz" and open_run_data(run).kind == "folder"

    # the data change: refused on resume and when scoring, naming the folder
    from PIL import Image
    png = root / "dog" / "01.png"
    img = np.asarray(Image.open(png)).copy()
    img[1, 1] = 255 - img[1, 1]
    Image.fromarray(img).save(png)
    with pytest.raises(DataChangedError, match=str(root.resolve())):
        train_run(cfg, run, progress=False)
    with pytest.raises(DataChangedError, match="changed since this run was made"):
        open_run_data(run)


def test_cli_tfds_source_end_to_end(tiny_pixel_pipeline, tmp_path):
    """`data.source=tfds` from the CLI: a tiny array_record tfds set built here, train ->
    generate -> attribute; the run references the data set; a rebuilt (changed) one is refused
    with exit 2 naming its data_dir."""
    pytest.importorskip("tensorflow_datasets")
    from typer.testing import CliRunner
    from tiny import make_tiny_tfds
    from jaxattrib.cli import app
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 12, 12, 3), dtype=np.uint8)
    captions = [f"a {c} circle on a black background" for c in
                ("red", "blue", "green", "yellow") * 2]
    data_dir = tmp_path / "tfds"
    name = make_tiny_tfds(data_dir, images, captions)
    run = tmp_path / "run"
    args = ["train", "finetune_folder", "--run-dir", str(run), "--no-progress",
            "--set", f"model='{tiny_pixel_pipeline}'", "--set", "data.source=tfds",
            "--set", f"data.name={name}", "--set", f"data.path='{data_dir}'",
            "--set", "data.caption_key=caption", "--set", "data.size=8",
            "--set", "data.max_examples=0", "--set", "finetune.steps=2",
            "--set", "finetune.batch_size=4", "--set", "finetune.checkpoint_every=1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    ref = json.loads((run / "data" / "source.json").read_text())
    assert ref["kind"] == "tfds" and ref["name"] == name and ref["n"] == 8
    src = open_run_data(run)
    assert sorted(src.captions) == sorted(captions)
    assert src.read([0]).shape == (1, 8, 8, 3)
    q = tmp_path / "q"
    r = CliRunner().invoke(app, ["generate", "--model", str(tiny_pixel_pipeline), "-p",
                                 "a red circle", "--steps", "2", "--out", str(q)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["attribute", str(run), "--queries", str(q), "--method",
                                 "dtrak", "--k", "16", "--timesteps", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    s = np.load(run / "scores" / "dtrak_q.npy")
    assert s.shape == (1, 8) and np.isfinite(s).all()
    # rebuild the data set with one image changed: resume refuses it (exit 2, names the dir)
    shutil.rmtree(data_dir)
    images[5, 3, 3, 0] ^= 1
    make_tiny_tfds(data_dir, images, captions)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "changed since this run was made" in r.output, r.output
    assert str(data_dir.resolve()) in r.output.replace("\n", "")
    bad = CliRunner().invoke(app, args[:5] + ["--set", "data.source=tfds", "--set",
                                              f"data.path='{data_dir}'"])
    assert bad.exit_code == 2 and "data.name" in bad.output


def test_check_train_config_accepts_tfds_and_names_missing_fields(tmp_path):
    from jaxattrib.config import ConfigError
    from jaxattrib.runs.config_check import check_train_config
    c = load_config("sd15_lora", [f"model={tmp_path}"])
    check_train_config(apply_overrides(c, ["data.source=tfds", "data.name=mnist",
                                           f"data.path={tmp_path}"]))
    with pytest.raises(ConfigError, match="data.name"):
        check_train_config(apply_overrides(c, ["data.source=tfds", f"data.path={tmp_path}"]))
    with pytest.raises(ConfigError, match="data.source='web'.*'tfds'"):
        check_train_config(apply_overrides(c, ["data.source=web"]))


def test_max_examples_cap_is_announced_and_applied(caplog):
    """A capped training set (``data.max_examples``) is never silent: a notice names the cap
    and the full size; no cap, no notice."""
    from jaxattrib.config import load_config
    from jaxattrib.runs.train import load_training_data
    capped = load_config("finetune_folder", ["data.source='digits'", "data.max_examples=5",
                                             "data.size=8"])
    src = load_training_data(capped)
    assert len(src) == 5
    assert "data.max_examples=5: using a random subset of 5 of the 1797" in caplog.text
    caplog.clear()
    full = load_config("finetune_folder", ["data.source='digits'", "data.max_examples=0",
                                           "data.size=8"])
    assert len(load_training_data(full)) == 1797 and "max_examples" not in caplog.text
