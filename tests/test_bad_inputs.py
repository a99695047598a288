"""Every bad input is one clear error (exit 2, no traceback) or an explicit notice; everything
checkable is checked before a model is loaded; the CLI's safety net. Each test (or case) backs
one row of docs/bad_inputs.md (generated: ``scripts/bad_inputs_table.py``)."""

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bad_inputs import DOC, bad_input, bad_input_cases, collect, render
from jaxattrib.cli import app
from jaxattrib.config import ConfigError, load_config

MOD = "test_bad_inputs"


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _clean(r, code=2):
    """One ``error:`` line, the exit code, no traceback."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    assert [ln.startswith("error:") for ln in r.output.splitlines()].count(True) == 1, r.output


@pytest.fixture
def no_models(monkeypatch):
    """Loading any model fails the test: the safety net would turn it into exit 1, not 2."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")
    import jaxattrib.train.base_model
    import jaxattrib.models.pipeline
    import jaxattrib.runs.attribute
    import jaxattrib.runs.specs
    import jaxattrib.runs.train
    for mod in (jaxattrib.runs.specs, jaxattrib.runs.train, jaxattrib.runs.attribute):
        monkeypatch.setattr(mod, "load_model", refuse)
    monkeypatch.setattr(jaxattrib.train.base_model, "load_base_model", refuse)
    monkeypatch.setattr(jaxattrib.models.pipeline, "load_pipeline", refuse)


def _png(path, size=8, seed=0, mode="RGB"):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def files(tmp_path):
    """Paths the cases below refer to as {name}."""
    f = {"run": tmp_path / "run", "file": tmp_path / "a_file", "prompts3": tmp_path / "p3.txt",
         "empty": tmp_path / "empty.txt"}
    f["file"].write_text("not a folder")
    f["prompts3"].write_text("a red circle\na blue square\n\na red square\n")
    f["empty"].write_text("\n  \n")
    return f


SRC = ("source-model", "source_model", "--run-dir", "{run}", "--set",
       "model.suspects=('pipeline',)")
CGI = ("cgi-dm", "cgi_dm", "--run-dir", "{run}", "--set", "model.finetuned=pipeline")
TRAIN = ("train", "finetune_folder", "--run-dir", "{run}")

CONFIG_CASES = [
    ("demo-k0", "`jaxattrib demo --set attribution.k=0`",
     "Exit 2 before the base model loads: `attribution.k=0: expected an integer >= 1`",
     ("demo", "--run-dir", "{run}", "--set", "attribution.k=0"), "attribution.k=0"),
    ("demo-lr", "`demo --set finetune.learning_rate=-1.0` (any out-of-range demo field)",
     "Exit 2 before anything loads, naming the field and the expected range",
     ("demo", "--run-dir", "{run}", "--set", "finetune.learning_rate=-1.0"),
     "finetune.learning_rate=-1.0: expected a positive"),
    ("demo-method", "`demo --set \"attribution.methods=('dtrak','nope')\"`",
     "Exit 2 before anything loads, listing the known methods",
     ("demo", "--run-dir", "{run}", "--set", "attribution.methods=('dtrak','nope')"),
     "attribution.methods"),
    ("demo-cgi-t", "`demo --set cgi_dm.t_min=500 --set cgi_dm.t_max=100`",
     "Exit 2: `cgi_dm.t_min=500 >= cgi_dm.t_max=100`",
     ("demo", "--run-dir", "{run}", "--set", "cgi_dm.t_min=500", "--set", "cgi_dm.t_max=100"),
     "t_min=500 >= cgi_dm.t_max=100"),
    ("unknown-field", "A mistyped `--set` field (`--set finetune.stepz=3`)",
     "Exit 2: `… has no field 'finetune.stepz'`",
     ("demo", "--run-dir", "{run}", "--set", "finetune.stepz=3"), "has no field"),
    ("wrong-type", "A `--set` value of the wrong type (`--set finetune.steps=abc`)",
     "Exit 2 naming the override and the type expected",
     ("demo", "--run-dir", "{run}", "--set", "finetune.steps=abc"), "finetune.steps=abc"),
    ("train-batch0", "`jaxattrib train … --set finetune.batch_size=0`",
     "Exit 2 before the model loads: `finetune.batch_size=0: expected an integer >= 1`",
     TRAIN + ("--set", "finetune.batch_size=0"), "finetune.batch_size=0"),
    ("train-path-file", "`train` with `data.path` a file, not a folder",
     "Exit 2: `data.path=…: expected an existing folder`",
     TRAIN + ("--set", "data.source=folder", "--set", "data.path='{file}'"),
     "expected an existing folder"),
    ("src-n-prompts", "`source-model` with a 3-prompt file and `key_samples.n=30`",
     "Exit 2 before any model loads: `key_samples.n=30: only 3 candidate prompts`",
     SRC + ("--set", "key_samples.prompts_file='{prompts3}'"),
     "key_samples.n=30: only 3 candidate prompts"),
    ("src-empty-file", "`source-model` with an empty prompts file (blank lines only)",
     "Exit 2 before any model loads: `key_samples.prompts_file=…: has no prompts`",
     SRC + ("--set", "key_samples.prompts_file='{empty}'"), "has no prompts"),
    ("src-empty-prompt", "`source-model` with an empty prompt in `key_samples.prompts`",
     "Exit 2: `key_samples.prompts[1] is empty`",
     SRC + ("--set", "key_samples.prompts=('a red circle', ' ')", "--set", "key_samples.n=1"),
     "key_samples.prompts[1] is empty"),
    ("cgi-no-folder", "`cgi-dm` whose `data.candidates` folder does not exist",
     "Exit 2 before any model loads: `data.candidates=…: expected an existing image folder`",
     CGI + ("--set", "data.candidates='{run}_none'", "--set", "data.reference='{run}_none'"),
     "data.candidates="),
    ("run-dir-file", "`--run-dir` is an existing file",
     "Exit 2: `run directory …: … is a file, not a folder`; the file is untouched",
     ("demo", "--run-dir", "{file}"), "is a file, not a folder"),
    ("run-dir-under-file", "`--run-dir` below a file (`a_file/run`)",
     "Exit 2 naming the file in the way",
     ("demo", "--run-dir", "{file}/run"), "is a file, not a folder"),
]


@pytest.mark.parametrize("args,expect", bad_input_cases(MOD, "test_config_errors_before_any_work",
                                                         CONFIG_CASES))
def test_config_errors_before_any_work(args, expect, files, no_models):
    r = _cli(*(a.format(**files) for a in args))
    _clean(r)
    assert expect in r.output
    assert files["file"].read_text() == "not a folder"
    assert not (files["run"] / "config.json").exists()   # nothing written: a retry is free


# ----------------------------------------------------------------------------- attribute

def _fake_run(run, model="embedded", size=8, config=None):
    """A `jaxattrib train` run directory's files that `attribute` reads before any model."""
    (run / "data").mkdir(parents=True)
    (run / "config.json").write_text(config if config is not None else
                                     json.dumps({"model": model}))
    np.savez(run / "data" / "train.npz", images=np.zeros((2, size, size, 3), np.float32),
             captions=np.array(["a", "b"]), ids=np.array(["0", "1"]))
    return run


def _queries(folder, n=2, size=8, prompts=True):
    for i in range(n):
        _png(folder / f"{i:03d}.png", size, seed=i)
    if prompts:
        (folder / "prompts.txt").write_text("".join(f"a red circle {i}\n" for i in range(n)))
    return folder


def _q_other_size(q):
    for p in q.glob("*.png"):
        _png(p, 16)


def _q_empty_prompts(q):
    (q / "prompts.txt").write_text("\n")


def _q_no_prompts(q):
    (q / "prompts.txt").unlink()


def _q_truncated(q):
    _truncate(q / "001.png")


def _q_mixed_sizes(q):
    _png(q / "002.png", 16)
    (q / "prompts.txt").write_text("a\nb\nc\n")


ATTRIBUTE_CASES = [
    ("k0", "`jaxattrib attribute RUN --k 0`", "Exit 2 before the model loads: "
     "`attribute.k=0: expected a positive integer`", None, ("--k", "0"), "attribute.k=0"),
    ("other-size", "Query images of another size than the training images",
     "Exit 2 before the model loads: `query images are (16, 16, 3), training images (8, 8, 3)`",
     _q_other_size, (), "query images are (16, 16, 3)"),
    ("mixed-sizes", "Query images of different sizes in one folder",
     "Exit 2: `query images of different sizes …`", _q_mixed_sizes, (),
     "query images of different sizes"),
    ("empty-prompts", "An empty `prompts.txt` in the query folder",
     "Exit 2: `prompts.txt: empty; expected one prompt per image`", _q_empty_prompts, (),
     "prompts.txt: empty"),
    ("no-prompts", "A query folder without `prompts.txt`",
     "Exit 2: `prompts.txt: missing; expected one prompt per image`", _q_no_prompts, (),
     "prompts.txt: missing"),
    ("truncated", "A truncated PNG (body cut off) among the query images",
     "Exit 2 naming the file: `…/001.png: not a readable PNG image (…)`", _q_truncated, (),
     "001.png: not a readable PNG image"),
    ("journey-no-traj", "`attribute --method journey-trak` on queries without `trajectory.npz`",
     "Exit 2 before the model loads: `trajectory.npz: missing; journey-trak needs the sampling "
     "trajectory (jaxattrib generate --trajectory)`", None, ("--method", "journey-trak"),
     "journey-trak needs the sampling trajectory"),
]


@pytest.mark.parametrize("edit,more,expect", bad_input_cases(
    MOD, "test_attribute_checks_inputs_before_loading", ATTRIBUTE_CASES))
def test_attribute_checks_inputs_before_loading(edit, more, expect, tmp_path, no_models):
    run = _fake_run(tmp_path / "run")
    q = _queries(tmp_path / "q")
    if edit is not None:
        edit(q)
    r = _cli("attribute", run, "--queries", q, "--no-progress", *more)
    _clean(r)
    assert expect in r.output


@bad_input("A run directory whose `config.json` is damaged (not JSON)",
           "Exit 2: `config.json: unreadable (…); this run directory's config is damaged: use a "
           "new --run-dir, or --fresh to start over`")
def test_damaged_run_config_is_a_clear_error(tmp_path, no_models):
    run = _fake_run(tmp_path / "run", config="{not json")
    r = _cli("attribute", run, "--queries", _queries(tmp_path / "q"))
    _clean(r)
    assert "config.json: unreadable" in r.output and "--fresh" in r.output


@bad_input("A non-image file (e.g. `notes.txt`) among the query PNGs",
           "Notice on stderr: `using the 2 PNG files; ignoring 1 other file(s): notes.txt`")
def test_non_image_file_in_query_folder_is_announced(tmp_path, caplog):
    from jaxattrib.runs.attribute import read_queries
    q = _queries(tmp_path / "q")
    (q / "notes.txt").write_text("hi")
    imgs, prompts = read_queries(q)
    assert imgs.shape == (2, 8, 8, 3) and len(prompts) == 2
    assert "ignoring 1 other file(s): notes.txt" in caplog.text   # a WARNING


# ----------------------------------------------------------------------------- image folders

def _bad_truncated(folder):
    _truncate(_png(folder / "b.png"))


def _bad_zero(folder):
    (folder / "b.png").write_bytes(b"")


def _bad_16bit(folder):
    from PIL import Image
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(folder / "b.png")


def _bad_text_as_png(folder):
    (folder / "b.png").write_text("this is not an image")


FOLDER_CASES = [
    ("truncated", "A truncated image (body cut off) in a training image folder",
     "Exit 2 naming the file: `…/b.png: unreadable or corrupt image (…)`", _bad_truncated,
     "b.png: unreadable or corrupt image"),
    ("zero-byte", "A zero-byte PNG in a training image folder",
     "Exit 2 naming the file: `…/b.png: unreadable or corrupt image`", _bad_zero,
     "b.png: unreadable or corrupt image"),
    ("16-bit", "A 16-bit PNG in a training image folder",
     "Exit 2 naming the file: `…/b.png: image mode 'I;16' cannot be read as RGB …`",
     _bad_16bit, "cannot be read as RGB"),
    ("text-as-png", "A text file named `*.png` in a training image folder",
     "Exit 2 naming the file: `…/b.png: unreadable or corrupt image`", _bad_text_as_png,
     "b.png: unreadable or corrupt image"),
]


@pytest.mark.parametrize("edit,expect", bad_input_cases(MOD, "test_bad_image_in_training_folder",
                                                        FOLDER_CASES))
def test_bad_image_in_training_folder(edit, expect, tmp_path, no_models):
    """`train` reads and checks every image before it loads the model."""
    folder = tmp_path / "imgs" / "dog"
    _png(folder / "a.png")
    edit(folder)
    r = _cli(*TRAIN[:3], tmp_path / "run", "--set", "data.source=folder",
             "--set", f"data.path='{tmp_path / 'imgs'}'", "--set", "data.size=8")
    _clean(r)
    assert expect in r.output


@bad_input("Non-image files (e.g. `notes.txt`, `.DS_Store`) in a training image folder",
           "Notice on stderr: `…/dog: using 1 image file(s); ignoring 1 non-image file(s): "
           "notes.txt` (hidden files and the folder's caption files are not listed)")
def test_non_image_file_in_training_folder_is_announced(tmp_path, caplog):
    from jaxattrib.data.folder import load_folder
    folder = tmp_path / "imgs" / "dog"
    _png(folder / "a.png")
    (folder / "notes.txt").write_text("x")
    (folder / ".DS_Store").write_bytes(b"x")
    (folder / "prompt.txt").write_text("a photo of sks dog")
    ds = load_folder(tmp_path / "imgs", size=8)
    assert len(ds) == 1
    err = caplog.text   # a WARNING of jaxattrib.data.folder: `notice: ...` on the CLI's stderr
    assert "using 1 image file(s); ignoring 1 non-image file(s): notes.txt" in err
    assert "DS_Store" not in err and "prompt.txt" not in err


@bad_input("Non-image files in a `cgi-dm` / `source-model` image folder",
           "Notice on stderr naming the ignored files and the number of images used")
def test_non_image_file_in_authentication_folder_is_announced(tmp_path, caplog):
    from jaxattrib.runs.specs import image_folder
    _png(tmp_path / "c" / "x.png")
    _png(tmp_path / "c" / "member" / "y.png")
    (tmp_path / "c" / "member" / "readme.md").write_text("x")
    out = image_folder(tmp_path / "c", 8, "data.candidates", labelled=True)
    assert list(out["ids"]) == ["x.png", "member/y.png"]
    assert "using 1 image file(s); ignoring 1 non-image file(s): readme.md" in caplog.text


# ----------------------------------------------------------------------------- models, prompts

@bad_input("An empty prompt (`jaxattrib generate -p \"\"`)",
           "Notice: `--prompt #1 is empty: its images are generated unconditionally`; the "
           "images are written")
def test_empty_prompt_is_announced(tiny_pixel_pipeline, tmp_path):
    r = _cli("generate", "--model", tiny_pixel_pipeline, "-p", "", "-p", "a red circle",
             "--steps", "2", "--out", tmp_path / "g")
    assert r.exit_code == 0, r.output
    assert "--prompt #1 is empty" in r.output and "#2" not in r.output
    assert len(list((tmp_path / "g").glob("*.png"))) == 2


@pytest.fixture
def pixel_record(tiny_pixel_pipeline, tmp_path):
    """A trajectory record (step 0) of the tiny pixel pipeline's UNet."""
    import jax.numpy as jnp
    from jaxattrib import parallel
    from jaxattrib.models.pipeline import load_pipeline
    from jaxattrib.train.finetune import TrainConfig, finetune
    pipe = load_pipeline(tiny_pixel_pipeline)
    _, rec = finetune(lambda p, b, k: jnp.zeros(b["x"].shape[0]), {"unet": pipe.unet_params}, 4,
                      lambda idx: {"x": np.zeros((len(idx), 1), np.float32)},
                      TrainConfig(steps=0, batch_size=1), tmp_path / "rec",
                      mesh=parallel.make_mesh(1), progress=False)
    rec.close()
    return tmp_path / "rec"


@bad_input("A trajectory record from another model (`generate --model A --record B's record`)",
           "Exit 2: `--record … is from another model: its UNet does not fit --model …'s "
           "(first differing parameters)`")
def test_record_from_another_model(tiny_latent_pipeline, pixel_record, tmp_path):
    r = _cli("generate", "--model", tiny_latent_pipeline, "--record", pixel_record, "-p", "a",
             "--steps", "2", "--out", tmp_path / "g")
    _clean(r)
    assert "is from another model" in r.output
    assert not list((tmp_path / "g").glob("*.png"))


@bad_input("A run directory made by an older version: its `config.json` lacks fields added "
           "since (e.g. `cgi.project_t`)", "Resumes: the missing fields are read with the "
           "values those runs used")
def test_config_from_an_older_version_resumes(tmp_path):
    from jaxattrib.runs.cgi_dm import CGI_ADDED_FIELDS
    from jaxattrib.runs.rundir import check_run_config
    # an old run used the mean (CGI_ADDED_FIELDS); resuming it states that value, since the
    # current default ('sample') would be another config
    c = load_config("cgi_dm", ["model.finetuned=x", "data.candidates=c", "data.reference=r",
                               "data.vae_posterior=mean"])
    old = json.loads(c.to_json())
    for dotted in CGI_ADDED_FIELDS:
        sec, name = dotted.split(".")
        del old[sec][name]
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "cgi_dm").mkdir()
    (tmp_path / "cgi_dm" / "inputs.json").write_text("{}")       # something computed
    check_run_config(tmp_path, c, added=CGI_ADDED_FIELDS)
    assert json.loads((tmp_path / "config.json").read_text()) == old     # kept as it was


@bad_input("A rerun with another config in a run directory that holds results",
           "Exit 2: `this run directory was made with another config (fields [...] differ: "
           "finetune.steps: stored 400, given 1); use a new --run-dir or pass --fresh, or resume "
           "it with --set for the stored values`; nothing is deleted")
def test_other_config_with_results_is_refused(tmp_path):
    from jaxattrib.runs.rundir import check_run_config
    c = load_config("demo")
    check_run_config(tmp_path, c)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.npz").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"fields \['finetune'\] differ: finetune.steps: "
                                          r"stored 400, given 1\).*--fresh"):
        check_run_config(tmp_path, load_config("demo", ["finetune.steps=1"]))
    assert (tmp_path / "data" / "train.npz").is_file()


@bad_input("A corrected retry after a run that failed before computing anything (e.g. a "
           "corrupt image, then the right folder)", "Runs: `notice: …config.json: nothing was "
           "computed in this run directory yet; its config is replaced by the new one`")
def test_failed_run_does_not_block_a_corrected_retry(tiny_pixel_pipeline, tmp_path):
    good, bad = tmp_path / "good" / "dog", tmp_path / "bad" / "dog"
    for i in range(4):
        _png(good / f"{i}.png", seed=i)
        _png(bad / f"{i}.png", seed=i)
    _truncate(bad / "3.png")
    args = [*TRAIN[:3], tmp_path / "run", "--no-progress",
            "--set", f"model='{tiny_pixel_pipeline}'",
            "--set", "data.source=folder", "--set", "data.size=8", "--set", "finetune.steps=1",
            "--set", "finetune.batch_size=2", "--set", "finetune.checkpoint_every=1"]
    r = _cli(*args, "--set", f"data.path='{bad.parent}'")
    _clean(r)
    assert (tmp_path / "run" / "config.json").is_file()
    r = _cli(*args, "--set", f"data.path='{good.parent}'")
    assert r.exit_code == 0, r.output
    assert "nothing was computed in this run directory yet" in r.output
    assert "checkpoints [0, 1]" in r.output


# ----------------------------------------------------------------------------- NaN / inf

def _nan_setup(kind):
    """16 examples of x; the loss (w - x)^2 + sqrt(|w x|) is finite except for example ``bad``:
    x = NaN (loss NaN) or x = 0 (loss finite, gradient NaN: d sqrt(|w·0|)/dw = 0·inf)."""
    from jaxattrib.train.finetune import batch_plan
    import jax.numpy as jnp
    n, bs = 16, 4
    first3 = set(batch_plan(0, 3, n, bs)[0].tolist()) - set(
        np.concatenate([batch_plan(0, s, n, bs)[0] for s in range(3)]).tolist())
    bad = sorted(first3)[0]             # first seen at update step 3
    x = np.linspace(1.0, 2.0, n).astype(np.float32)
    x[bad] = np.nan if kind == "loss" else 0.0

    def loss_fn(p, b, k):
        w = p["m"]["w"]
        return (w - b["x"]) ** 2 + jnp.sqrt(jnp.abs(w * b["x"]))
    return loss_fn, x, n, bs


NAN_CASES = [
    ("loss", "NaN/inf in the training loss (e.g. a NaN pixel, a diverging learning rate)",
     "The stage stops (exit 2 in the CLI): `finetune: loss=nan at update step S (not finite)`; "
     "the record keeps its last good checkpoint and its step log is cut back to it", "loss"),
    ("grad", "NaN/inf in the gradients while the loss is finite",
     "The stage stops: `finetune: grad_norm=nan at update step S`; last good checkpoint kept",
     "grad"),
]


@pytest.mark.parametrize("kind", bad_input_cases(MOD, "test_non_finite_loss_stops_the_stage",
                                                 NAN_CASES))
def test_non_finite_loss_stops_the_stage(kind, tmp_path):
    from jaxattrib import parallel
    from jaxattrib.train.finetune import NonFiniteLossError, TrainConfig, finetune
    from jaxattrib.train.record import TrajectoryRecord
    loss_fn, x, n, bs = _nan_setup(kind)
    cfg = TrainConfig(steps=8, batch_size=bs, checkpoint_every=2, learning_rate=1e-2, log_every=1)
    init = {"m": {"w": np.ones((), np.float32)}}
    with pytest.raises(NonFiniteLossError, match=("loss" if kind == "loss" else "grad_norm")
                       + r"=nan at update step 3 .*last good checkpoint, step 2"):
        finetune(loss_fn, init, n, lambda idx: {"x": x[idx]}, cfg, tmp_path / "rec",
                 mesh=parallel.make_mesh(1), progress=False)
    rec = TrajectoryRecord.open(tmp_path / "rec")
    assert rec.steps() == [0, 2] and rec.logged_steps() == [0, 1]
    clean = x.copy()
    clean[~np.isfinite(clean) | (clean == 0)] = 1.5
    _, ok = finetune(loss_fn, init, n, lambda idx: {"x": clean[idx]}, cfg, tmp_path / "ok",
                     mesh=parallel.make_mesh(1), progress=False)
    kept, want = rec.load(2)["m"]["w"], ok.load(2)["m"]["w"]
    assert np.isfinite(kept) and float(kept) == float(want)     # the last good state, intact


# ----------------------------------------------------------------------------- disk, safety net

def _train_args(tmp_path, pipe):
    return [*TRAIN[:3], tmp_path / "run", "--no-progress", "--set", f"model='{pipe}'",
            "--set", "data.source=digits", "--set", "data.size=8"]


DISK_CASES = [
    ("enospc", "A full disk (ENOSPC from the atomic writer)",
     "Exit 2: `…/config.json: no space left on the device: free some space and rerun "
     "(finished stages are kept; the run resumes)`", errno.ENOSPC, "no space left on the device"),
    ("erofs", "A run directory on a read-only file system (EROFS from the writer)",
     "Exit 2: `…: read-only file system: give a writable --run-dir / output folder`",
     errno.EROFS, "read-only file system"),
    ("eacces", "A run directory the writer may not write (EACCES)",
     "Exit 2: `…: permission denied: give a writable --run-dir …`", errno.EACCES,
     "permission denied"),
]


@pytest.mark.parametrize("code,expect", bad_input_cases(MOD, "test_disk_errors_are_clear",
                                                        DISK_CASES))
def test_disk_errors_are_clear(code, expect, tmp_path, monkeypatch, no_models):
    import jaxattrib.fileio

    def failing(path, data):
        raise OSError(code, os.strerror(code), str(path))
    monkeypatch.setattr(jaxattrib.fileio, "atomic_write_bytes", failing)
    r = _cli(*_train_args(tmp_path, "embedded"))
    _clean(r)
    assert expect in r.output and "config.json" in r.output
    assert not (tmp_path / "run" / ".jaxattrib.lock").exists()          # lock released


@bad_input("A run directory that is not writable (permissions)",
           "Exit 2 at once: `run directory …: not writable by this user; give a writable folder`")
def test_unwritable_run_dir(tmp_path, monkeypatch, no_models):
    import jaxattrib.runlock
    run = tmp_path / "ro"
    run.mkdir()
    run.chmod(0o555)
    real = os.access
    monkeypatch.setattr(jaxattrib.runlock.os, "access",     # root ignores permission bits
                        lambda p, m, **k: False if Path(p) == run and m & os.W_OK
                        else real(p, m, **k))
    try:
        r = _cli("demo", "--run-dir", run)
    finally:
        run.chmod(0o755)
    _clean(r)
    assert "not writable by this user" in r.output


@bad_input("An unexpected exception (a bug) inside a command",
           "Exit 1 with one line: `error: unexpected ZeroDivisionError: … (a bug? the traceback "
           "is saved in RUN_DIR/errors/traceback-….txt)`; no traceback on screen; lock released")
def test_unexpected_error_saves_its_traceback_in_the_run_dir(tmp_path, monkeypatch):
    import jaxattrib.runs.train

    def boom(*a, **k):
        raise ZeroDivisionError("boom in train_run")
    monkeypatch.setattr(jaxattrib.runs.train, "train_run", boom)
    r = _cli(*_train_args(tmp_path, "embedded"))
    _clean(r, code=1)
    assert "unexpected ZeroDivisionError: boom in train_run" in r.output
    saved = list((tmp_path / "run" / "errors").glob("traceback-*.txt"))
    assert len(saved) == 1 and str(saved[0]) in " ".join(r.output.split())
    text = saved[0].read_text()
    assert "Traceback (most recent call last)" in text and "boom in train_run" in text
    assert not (tmp_path / "run" / ".jaxattrib.lock").exists()


@bad_input("An unexpected exception in a command without a run directory (`info`)",
           "Exit 1 with one line naming a traceback file in a new temp folder")
def test_unexpected_error_without_run_dir_goes_to_a_temp_dir(monkeypatch):
    import jaxattrib.cli

    def boom(*a, **k):
        raise KeyError("weird")
    monkeypatch.setattr(jaxattrib.cli, "_load_model", boom)
    r = _cli("info", "somewhere")
    _clean(r, code=1)
    path = Path(r.output.split("traceback is saved in ")[1].split(")")[0].strip())
    assert path.is_file() and "KeyError" in path.read_text()
    assert path.parent.name.startswith("jaxattrib-error-")


@bad_input("An OS error that is not the user's (e.g. EIO from the disk)",
           "Treated as unexpected: exit 1, one line, traceback saved")
def test_unexpected_os_error_is_not_hidden(tmp_path, monkeypatch, no_models):
    import jaxattrib.fileio

    def failing(path, data):
        raise OSError(errno.EIO, "Input/output error", str(path))
    monkeypatch.setattr(jaxattrib.fileio, "atomic_write_bytes", failing)
    r = _cli(*_train_args(tmp_path, "embedded"))
    _clean(r, code=1)
    assert "unexpected OSError" in r.output


def _expected_classes():
    from jaxattrib.cli import expected_errors
    return expected_errors()


@bad_input("Any expected error class (ConfigError, CheckpointError, DataError, RecordError, "
           "StoreMismatchError, CGIDMError, SourceModelError, MontrageError, ReportError, "
           "RunLockError, NonFiniteLossError) raised anywhere in any command",
           "Exit 2 with its message on one line; never a traceback")
def test_every_expected_error_class_exits_2(tmp_path, monkeypatch):
    import jaxattrib.runs.train
    from jaxattrib.attribution.store import StoreMismatchError
    for cls in _expected_classes():
        def raise_it(*a, **k):
            if issubclass(cls, StoreMismatchError):
                raise cls("a StoreMismatchError message", {"k": (1, 2)})
            raise cls(f"a {cls.__name__} message")
        monkeypatch.setattr(jaxattrib.runs.train, "train_run", raise_it)
        r = _cli(*_train_args(tmp_path, "embedded"))
        _clean(r)
        assert f"a {cls.__name__} message" in r.output


def test_bad_inputs_doc_is_current():
    """docs/bad_inputs.md is generated from these tests (scripts/bad_inputs_table.py)."""
    rows = collect()
    assert len(rows) >= 30
    assert DOC.read_text() == render(rows), \
        "docs/bad_inputs.md is stale: run `python scripts/bad_inputs_table.py`"


@bad_input("A benchmark script rerun on a run directory made with another config",
           "Exit 2: one `error:` line naming the field and both values (`attribution.noise: "
           "stored 'per_position', given 'shared'`); no traceback, nothing deleted")
def test_benchmark_script_refuses_another_config_without_a_traceback(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("ct_bench_script",
                                                  root / "benchmarks" / "concept_trak.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = json.loads(load_config("concept_trak:smoke").to_json())
    c["attribution"]["noise"] = "per_position"
    (tmp_path / "config.json").write_text(json.dumps(c))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.npz").write_bytes(b"x")             # something computed
    with pytest.raises(SystemExit) as e:
        mod.main(["--smoke", "--run-dir", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "attribution.noise: stored 'per_position', given 'shared'" in err
    assert (tmp_path / "data" / "train.npz").is_file()
