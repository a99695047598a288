"""The latent (VAE) path end to end: train → generate → attribute (four methods) → report on the
tiny latent pipeline written by diffusers (tests/tiny.py), the latent cache, and the shape
errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxattrib.config import ConfigError


def _cli(*args):
    from typer.testing import CliRunner
    from jaxattrib.cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


def _folder_data(root, n=4, size=16):
    from PIL import Image
    d = root / "db" / "dog"
    d.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (size, size, 3), np.uint8)).save(d / f"{i:02d}.png")
    (d / "prompt.txt").write_text("a red circle")
    return root / "db"


def _train_args(model, data, run, size=16):
    return ["train", "sd15_lora", "--run-dir", run, "--no-progress", "--set", f"model='{model}'",
            "--set", f"data.path='{data}'", "--set", f"data.size={size}",
            "--set", "finetune.steps=2", "--set", "finetune.batch_size=4",
            "--set", "finetune.checkpoint_every=1", "--set", "attribution.k=16",
            "--set", "attribution.num_timesteps=2", "--set", "attribution.microbatch=2"]


def _query_folder(q, size, traj_hw):
    from PIL import Image
    q.mkdir()
    for i in range(2):
        Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(q / f"{i}.png")
    (q / "prompts.txt").write_text("a red circle\na blue square\n")
    np.savez(q / "trajectory.npz", timesteps=np.array([[500, 0]] * 2),
             xs=np.zeros((2, 2) + traj_hw, np.float32),
             x0_preds=np.zeros((2, 2) + traj_hw, np.float32))


def _stat(folder):
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.iterdir())}


def test_latent_pipeline_train_generate_attribute_report(tiny_latent_pipeline, tmp_path):
    import jax
    from jaxattrib.attribution import diffusion_trak as dt
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.models.pipeline import load_pipeline
    from jaxattrib.models.vae import encode_latents
    from jaxattrib.train.record import TrajectoryRecord
    model = shutil.copytree(tiny_latent_pipeline, tmp_path / "pipe")
    data, run, q = _folder_data(tmp_path), tmp_path / "run", tmp_path / "q"
    r = _cli(*_train_args(model, data, run))
    assert r.exit_code == 0, r.output
    manifest = json.loads((run / "record" / "manifest.json").read_text())
    assert manifest["model"]["vae_latents"] == "mean"       # trained on what attribution uses
    r = _cli("generate", "--model", model, "--record", run / "record", "-p", "a red circle",
             "-p", "a blue square", "--steps", "2", "--out", q, "--trajectory")
    assert r.exit_code == 0, r.output
    traj = np.load(q / "trajectory.npz")
    assert traj["x0_preds"].shape == (2, 2, 8, 8, 4)       # latent space, not pixels
    for method in ("dtrak", "trak", "journey-trak", "tracin"):
        r = _cli("attribute", run, "--queries", q, "--method", method, "--no-progress")
        assert r.exit_code == 0, (method, r.output)
        s = np.load(run / "scores" / f"{method}_q.npy")
        assert s.shape == (2, 4) and np.isfinite(s).all() and np.abs(s).max() > 0, method
    # the training set was VAE-encoded once: a rerun reads the same chunk files
    before = _stat(run / "latents" / "train")
    r = _cli("attribute", run, "--queries", q, "--method", "dtrak", "--no-progress")
    assert r.exit_code == 0, r.output
    assert _stat(run / "latents" / "train") == before
    r = _cli("report", run)
    assert r.exit_code == 0, r.output
    html = (run / "report.html").read_text()
    assert html.count("<img") >= 4 and "decoded x0" in html

    # ground truth by construction: encode by hand with the VAE port, call the pixel-free core
    pipe = load_pipeline(model)
    from jaxattrib.data.run_data import open_run_data
    assert not (run / "data" / "train.npz").exists()   # data/source.json refers to the data
    d = open_run_data(run)
    images, captions = d.read(np.arange(len(d))), list(d.captions)
    z = np.asarray(encode_latents(pipe.vae_params, pipe.vae_config, images, None))
    cached = np.load(run / "latents" / "train" / "chunk_00000.npy").reshape(z.shape)
    np.testing.assert_allclose(cached, z, rtol=1e-5, atol=1e-6)
    from jaxattrib.runs.attribute import read_queries
    q_img, q_prompts = read_queries(q)
    zq = np.asarray(encode_latents(pipe.vae_params, pipe.vae_config, q_img, None))
    ac = dt.AttributionConfig(method="dtrak", k=16, params="attn2", num_timesteps=2,
                              projection="sjlt", microbatch=2)
    rec = TrajectoryRecord.open((run / "record").resolve())
    p = rec.load(rec.steps()[-1])["unet"]
    sched = schedule_from_diffusers_config(pipe.scheduler_config)
    fn = dt.make_train_out_fn(pipe.unet_config, sched, ac)
    Phi = dt.featurize_examples(fn, p, {"x0": z, "ctx": np.asarray(
        pipe.encode_prompts(captions))}, ac, tmp_path / "hand" / "train", fingerprint="h",
        progress=False)
    phi = dt.featurize_examples(fn, p, {"x0": zq, "ctx": np.asarray(
        pipe.encode_prompts(q_prompts))}, ac, tmp_path / "hand" / "q", fingerprint="hq",
        progress=False)
    want = dt.scores_from_features(phi, Phi, dt.relative_lambdas(Phi, [1.0])[0])
    np.testing.assert_allclose(np.load(run / "scores" / "dtrak_q.npy"), want, rtol=1e-4,
                               atol=1e-6 * np.abs(want).max())

    # pixels where latents are expected (a pixel trajectory), query PNGs of another size:
    # one error naming the field and both shapes, exit 2
    for name, size, traj_hw, expect in (
            ("q_pix", 16, (16, 16, 3), ["trajectory.npz x0_preds", "pixel images 16x16x3",
                                        "latents 8x8x4"]),
            ("q_small", 8, (8, 8, 4), ["query images", "8x8x3", "16x16x3"])):
        _query_folder(tmp_path / name, size, traj_hw)
        r = _cli("attribute", run, "--queries", tmp_path / name, "--method", "journey-trak",
                 "--no-progress")
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert all(e in r.output for e in expect), (name, r.output)

    # the VAE weights change under the run: refused (exit 2), nothing reused silently
    from jaxattrib.models import vae as vae_lib
    vp = {**pipe.vae_params}
    vp["encoder"] = jax.tree_util.tree_map(lambda a: np.asarray(a) * 1.01, vp["encoder"])
    vae_lib.save_pretrained(Path(model) / "vae", pipe.vae_config, vp)
    r = _cli("attribute", run, "--queries", q, "--method", "dtrak", "--no-progress")
    assert r.exit_code == 2 and "vae" in r.output and "Traceback" not in r.output
    assert _stat(run / "latents" / "train") == before


def test_latent_store_is_keyed_and_resumes_from_a_batch_iterator(tiny_latent_pipeline,
                                                                 tmp_path):
    from jaxattrib.runs.latent_cache import (LatentCacheError, fill_latent_store,
                                        open_latent_store, read_latents)
    from jaxattrib.models.pipeline import load_pipeline
    pipe = load_pipeline(tiny_latent_pipeline)
    images = np.random.default_rng(0).uniform(-1, 1, (5, 16, 16, 3)).astype(np.float32)
    calls = []

    def encode(x):                     # a stand-in encoder: ground truth by construction
        calls.append(len(x))
        return np.repeat(x[:, ::2, ::2, :1], 4, axis=-1) * 2.0

    def batches(stop_after=None):      # an iterator over rows, 3 at a time (not chunk-aligned)
        for k, start in enumerate(range(0, 5, 3)):
            if stop_after is not None and k == stop_after:
                raise KeyboardInterrupt          # killed mid-way
            yield start, images[start:start + 3]

    key = dict(data_fingerprint="d", vae_fingerprint="v")
    st = open_latent_store(tmp_path / "lat", pipe, 5, chunk_size=2, **key)
    with pytest.raises(KeyboardInterrupt):
        fill_latent_store(st, batches(stop_after=1), encode, progress=False)
    assert st.missing_chunks() == [1, 2]        # chunk 0 (rows 0-1) written; row 2 pending
    calls.clear()
    fill_latent_store(st, batches(), encode, progress=False)
    assert calls == [1, 2]                      # only the rows of missing chunks are encoded
    np.testing.assert_array_equal(read_latents(st), encode(images))
    calls.clear()
    fill_latent_store(open_latent_store(tmp_path / "lat", pipe, 5, chunk_size=2, **key),
                      batches(), encode, progress=False)
    assert calls == []                          # complete: reused
    with pytest.raises(LatentCacheError, match="(?s)VAE weights differ.*vae_fingerprint"):
        open_latent_store(tmp_path / "lat", pipe, 5, chunk_size=2, data_fingerprint="d",
                          vae_fingerprint="other")
    with pytest.raises(LatentCacheError, match="data_fingerprint"):
        open_latent_store(tmp_path / "lat", pipe, 5, chunk_size=2, data_fingerprint="x",
                          vae_fingerprint="v")


def test_latent_shape_errors_name_the_field_and_both_shapes(tiny_latent_pipeline, tmp_path):
    from jaxattrib.diffusion.latents import check_model_input, encode_images
    from jaxattrib.models.pipeline import load_pipeline
    pipe = load_pipeline(tiny_latent_pipeline)
    pixels = np.zeros((2, 16, 16, 3), np.float32)
    with pytest.raises(ConfigError, match=r"x0: got pixel images 16x16x3 where the latent "
                                          r"pipeline expects VAE latents 8x8x4"):
        check_model_input(pixels.shape, pipe.unet_config, pipe.vae_config, "x0")
    z = encode_images(pipe.vae_config, pipe.vae_params, pixels)
    check_model_input(z.shape, pipe.unet_config, pipe.vae_config, "x0")   # accepted
    # CLI: data.size that is not sample size x VAE factor -> exit 2, no traceback
    data = _folder_data(tmp_path, size=8)
    r = _cli(*_train_args(tiny_latent_pipeline, data, tmp_path / "run", size=8))
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "data.size=8" in r.output and "8x8x3" in r.output and "16x16x3" in r.output
    assert "8x8x4 latents" in r.output and not (tmp_path / "run" / "record").exists()


@pytest.mark.slow  # a whole demo with every method and CGI-DM (time in docs/latents.md)
def test_demo_runs_on_a_latent_base_model(tiny_latent_pipeline, tmp_path):
    """`jaxattrib demo --set base_model=LATENT_PIPE` runs every method it runs on the pixel base
    model: fine-tunes through the VAE, generates, attributes (D-TRAK, TRAK, TracIn,
    Concept-TRAK, MONTRAGE, MONTRAGE-final on latents; pixel similarity), runs CGI-DM (PGD on
    the latent) and writes the report with images (decoded pixels)."""
    import dataclasses

    from jaxattrib.train import base_model as bm
    model = shutil.copytree(tiny_latent_pipeline, tmp_path / "pipe")
    info = {"data_spec": dataclasses.asdict(bm.data_spec()),      # the 16-px spec: the tiny
            "held_out": list(bm.HELD_OUT)}                        # pipeline's image size
    (model / "jaxattrib_base.json").write_text(json.dumps(info))
    run = tmp_path / "demo"
    methods = ("dtrak", "trak", "tracin", "concept-trak", "montrage", "montrage-final", "pixel")
    sets = [f"base_model='{model}'", "data.exemplars_per_concept=2",
            "data.holdouts_per_concept=1", "data.distractors=4", "data.per_combination=1",
            "finetune.steps=2", "finetune.batch_size=4", "finetune.checkpoint_every=1",
            "generate.per_concept=2", "generate.num_inference_steps=2", "attribution.k=16",
            "attribution.num_timesteps=2", "attribution.microbatch=4",
            "attribution.lambda_ratios=(1.0,)", "attribution.concept_inversion_steps=5",
            f"attribution.methods={methods!r}", "cgi_dm.enabled=True", "cgi_dm.num_steps=2",
            "cgi_dm.batch_size=4"]
    args = ["demo", "--run-dir", run, "--no-progress"] + [a for x in sets for a in ("--set", x)]
    r = _cli(*args)
    assert r.exit_code == 0, r.output
    manifest = json.loads((run / "record" / "manifest.json").read_text())
    assert manifest["model"]["vae_latents"] == "mean"
    for m in methods:
        s = np.load(run / "scores" / f"{m}.npy")
        assert s.shape == (8, 12) and np.isfinite(s).all(), m
    cg = np.load(run / "cgi_dm" / "scores.npz")
    n_ev = 8 + 2     # 8 members (exemplars) + the second half of the 4 hold-outs
    assert cg["scores"].shape == (n_ev,) and np.isfinite(cg["scores"]).all()
    assert cg["recovered"].shape == (n_ev, 16, 16, 3)          # decoded pixels
    assert cg["labels"].sum() == 8
    html = (run / "report.html").read_text()
    assert html.count("<img") >= 4                  # the PNGs below, embedded
    assert "original | masked | recovered" in html and "VAE-decoded" in html
    for png in ("generations.png", "cgi_dm_examples.png", "cgi_dm_roc.png"):
        assert (run / "results" / png).stat().st_size > 0, png
