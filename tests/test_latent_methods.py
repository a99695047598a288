"""The authentication / concept commands and MONTRAGE on a latent (VAE) pipeline: ``cgi-dm``,
``source-model`` and ``concept-query`` end to end through the CLI on the tiny latent pipeline
(tests/tiny.py), MONTRAGE on latents through its Python API, and the one-line errors for pixel
images where latents are expected or a size that is not sample_size x VAE factor."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from tiny import perturbed_copy  # noqa: E402

from jaxattrib.models import latent_io  # noqa: E402

SIZE, LAT = 16, (8, 8, 4)   # the tiny latent pipeline: 16-px images, 8x8x4 latents


def _cli(args):
    from typer.testing import CliRunner

    from jaxattrib.cli import app
    return CliRunner().invoke(app, ["--no-compile-cache", *args])


def _smooth_images(n, seed, size=SIZE):
    """Smooth random RGB images in [-1, 1] (low-frequency, so the VAE sees image-like input)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(-1, 1, (n, 4, 4, 3))
    return np.clip(np.repeat(np.repeat(small, size // 4, 1), size // 4, 2), -1, 1) \
        .astype(np.float32)


def _write_pngs(folder, images, prompts=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        Image.fromarray(np.round((x + 1) * 127.5).astype(np.uint8)).save(folder / f"{i:02d}.png")
    if prompts is not None:
        (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")


@pytest.fixture(scope="module")
def latent_pipe(tiny_latent_pipeline):
    from jaxattrib.models.pipeline import load_pipeline
    return load_pipeline(tiny_latent_pipeline)


@pytest.fixture(scope="module")
def finetuned(tiny_latent_pipeline, tmp_path_factory):
    """The tiny latent pipeline with a perturbed UNet (stands in for a fine-tuned model)."""
    return perturbed_copy(tiny_latent_pipeline, tmp_path_factory.mktemp("ft"), seed=1)


# ----------------------------------------------------------------------------- latent_io


def test_encode_images_sample_per_image_key_and_mean(latent_pipe):
    from jaxattrib.models.vae import encode_latents
    x = _smooth_images(5, 0)
    vp, vc = latent_pipe.vae_params, latent_pipe.vae_config
    key = jax.random.PRNGKey(3)
    z = latent_io.encode_images(vp, vc, x, key=key, batch_size=2)   # batches 2 + 2 + 1(padded)
    assert z.shape == (5,) + LAT
    by_hand = np.stack([np.asarray(encode_latents(vp, vc, x[i:i + 1],
                                                  jax.random.fold_in(key, i)))[0]
                        for i in range(5)])
    np.testing.assert_allclose(z, by_hand, rtol=1e-5, atol=1e-6)
    # the same image at a global offset gets that index's key: batching does not matter
    z2 = latent_io.encode_images(vp, vc, x[2:], key=key, index_offset=2, batch_size=8)
    np.testing.assert_allclose(z2, z[2:], rtol=1e-5, atol=1e-6)
    mean = latent_io.encode_images(vp, vc, x)
    np.testing.assert_allclose(mean, np.asarray(encode_latents(vp, vc, x, None)), rtol=1e-5,
                               atol=1e-6)
    assert np.abs(mean - z).max() > 1e-4          # a sample is not the mean
    back = latent_io.pipeline_pixels(latent_pipe, z)
    assert back.shape == (5, SIZE, SIZE, 3)


def test_pixel_vs_latent_shape_errors_are_one_clear_line(latent_pipe, tiny_latent_pipeline,
                                                          tmp_path):
    from jaxattrib.attribution import montrage as M
    from jaxattrib.config import ConfigError
    u, v = latent_pipe.unet_config, latent_pipe.vae_config
    pixels = _smooth_images(2, 1)
    # pixels where latents are expected (MONTRAGE's model inputs)
    with pytest.raises(M.MontrageInputError) as e:
        M.extract_representations(u, latent_pipe.unet_params, pixels, None, batch_size=2)
    msg = str(e.value)
    assert isinstance(e.value, ConfigError) and "\n" not in msg
    assert "[2, 16, 16, 3]" in msg and "[N, 8, 8, 4]" in msg
    assert msg == ("RepresentationExtractor images: got shape [2, 16, 16, 3] (pixel images? "
                   "encode them with the VAE first); the model expects model inputs [N, 8, 8, 4] "
                   "(UNet sample_size 8, in_channels 4: VAE latents of a latent model, not its "
                   "pixel images)")
    # latents of the wrong size
    with pytest.raises(latent_io.ModelInputError, match=r"z: got shape \[1, 4, 4, 4\]"):
        latent_io.check_model_inputs(np.zeros((1, 4, 4, 4)), u, "z", v)
    # pixel images of a size that is not sample_size x VAE factor
    with pytest.raises(latent_io.ModelInputError) as e:
        latent_io.pipeline_inputs(latent_pipe, _smooth_images(1, 2, size=32), "--image")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--image: got images of shape [1, 32, 32, 3]")
    assert "[N, 16, 16, 3] (UNet sample_size 8 x VAE factor 2)" in msg
    # through the CLI: cgi-dm with data.size that does not fit -> exit 2, one line, no traceback
    _write_pngs(tmp_path / "c", pixels)
    r = _cli(["cgi-dm", "cgi_dm", "--run-dir", str(tmp_path / "run"),
              "--set", f"model.pipeline={tiny_latent_pipeline}",
              "--set", f"model.finetuned={tiny_latent_pipeline}",
              "--set", f"data.candidates={tmp_path / 'c'}",
              "--set", f"data.reference={tmp_path / 'c'}", "--set", "data.size=8"])
    assert r.exit_code == 2, r.output
    err = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(err) == 1 and "Traceback" not in r.output
    assert err[0] == ("error: data.size=8: images would be [8, 8, 3]; the model works on "
                      "[16, 16, 3] images = UNet sample_size 8 x VAE factor 2 (latents "
                      "[8, 8, 4]); set data.size=16 or 0")


# ----------------------------------------------------------------------------- CGI-DM


def test_cgi_dm_pgd_on_latents_increases_the_contrastive_objective(latent_pipe, finetuned):
    """[code] PGD runs on the VAE latent: the objective L_pre − L_ft, estimated with the same
    fixed (t, ε) draws, is larger at the recovered latent than at the masked start."""
    from jax.tree_util import Partial

    from jaxattrib.authentication import cgi_dm
    from jaxattrib.diffusion.schedule import schedule_from_diffusers_config
    from jaxattrib.models.pipeline import load_pipeline
    from jaxattrib.models.unet import UNet2DConditionModel
    ft = load_pipeline(finetuned)
    model = UNet2DConditionModel(latent_pipe.unet_config)
    apply = lambda p, z, t, c: model.apply({"params": p}, z, t, c)  # noqa: E731
    e_pre, e_ft = Partial(apply, latent_pipe.unet_params), Partial(apply, ft.unet_params)
    sched = schedule_from_diffusers_config(latent_pipe.scheduler_config)
    x = _smooth_images(2, 4)
    z0 = latent_io.encode_images(latent_pipe.vae_params, latent_pipe.vae_config, x,
                                 key=jax.random.PRNGKey(0))
    ctx = np.asarray(latent_pipe.encode_prompts(["a red circle"] * 2))
    cfg = cgi_dm.CGIDMConfig(num_steps=10, t_min=400, t_max=400, n_noise=2, block=2)
    mask = cgi_dm.batch_masks(cfg, z0.shape, jax.random.PRNGKey(1))
    z_init = mask * z0
    z_rec = cgi_dm.pgd_invert(e_pre, e_ft, sched, z0, mask, ctx, cfg, jax.random.PRNGKey(2),
                              z_init=z_init)
    assert z_rec.shape == (2,) + LAT
    np.testing.assert_allclose(np.asarray(z_rec * mask), np.asarray(z0 * mask), atol=1e-6)
    k = 16
    t = jnp.full((k, 2), 400)
    noise = jax.random.normal(jax.random.PRNGKey(9), (k, 2) + LAT)
    def j(z):
        return np.asarray(cgi_dm.contrastive_objective(e_pre, e_ft, sched, z, t, noise, ctx))
    assert (j(z_rec) > j(z_init)).all(), (j(z_rec), j(z_init))


def test_cli_cgi_dm_on_latent_pipeline(tiny_latent_pipeline, finetuned, tmp_path):
    cand, ref = _smooth_images(3, 10), _smooth_images(3, 11)
    _write_pngs(tmp_path / "cand", cand)
    _write_pngs(tmp_path / "ref", ref)
    run = tmp_path / "run"
    args = ["cgi-dm", "cgi_dm", "--run-dir", str(run), "--no-progress",
            "--set", f"model.pipeline={tiny_latent_pipeline}",
            "--set", f"model.finetuned={finetuned}",
            "--set", f"data.candidates={tmp_path / 'cand'}",
            "--set", f"data.reference={tmp_path / 'ref'}", "--set", "data.caption=a red circle",
            "--set", "cgi.num_steps=4", "--set", "batch_size=3", "--set", "report_images=3"]
    r = _cli(args)
    assert r.exit_code == 0, r.output
    assert "PGD on=VAE latents [8, 8, 4]" in r.output
    rec = dict(np.load(run / "cgi_dm" / "candidates_000000.npz"))
    # original / masked / recovered are pixels (decoded), the mask is a latent mask
    for name in ("original", "masked", "recovered"):
        assert rec[name].shape == (3, SIZE, SIZE, 3), name
    assert rec["mask"].shape == (3,) + LAT
    np.testing.assert_allclose(rec["original"], cand, atol=1 / 127.5 + 1e-6)
    assert np.abs(rec["recovered"] - rec["masked"]).max() > 1e-3   # PGD moved the latent
    assert rec["trace"].shape == (4, 3) and np.isfinite(rec["trace"]).all()
    assert np.abs(rec["trace"]).max() > 0                         # the two models differ
    scores = dict(np.load(run / "cgi_dm" / "scores.npz"))
    assert np.isfinite(scores["scores"]).all() and scores["scores"].shape == (3,)
    grid = Image.open(run / "results" / "cgi_dm_images.png")
    assert grid.size[0] >= 3 * SIZE                     # a grid of 16-px pixel images
    text = json.loads((run / "results" / "cgi_dm.json").read_text())
    assert "decoded to pixels" in json.dumps(text)
    assert (run / "report.html").is_file()
    # the start latent is from posterior samples with the recorded keys (candidates = set 0):
    # z0 ~ q(z | x_i) with fold_in(k_i, ·), z_init = encode(decode(M ⊙ z0)) with fold_in(k_i, 1)
    from jaxattrib.authentication.cgi_dm import CGIDMConfig, checkerboard_mask
    from jaxattrib.models.pipeline import load_pipeline
    from jaxattrib.models.vae import decode_latents, encode_latents
    pipe = load_pipeline(tiny_latent_pipeline)
    vp, vc = pipe.vae_params, pipe.vae_config
    k_enc = jax.random.fold_in(jax.random.split(jax.random.PRNGKey(0), 3)[2], 0)
    mask = checkerboard_mask((1,) + LAT, CGIDMConfig().block)
    np.testing.assert_array_equal(rec["mask"][:1], mask)
    x = jnp.asarray(rec["original"])
    for i in range(3):
        ki = jax.random.fold_in(k_enc, i)
        z0 = encode_latents(vp, vc, x[i:i + 1], ki)
        z_init = encode_latents(vp, vc, decode_latents(vp, vc, mask * z0),
                                jax.random.fold_in(ki, 1))
        np.testing.assert_allclose(rec["masked"][i], np.asarray(decode_latents(vp, vc,
                                                                               z_init))[0],
                                   atol=1e-4)
        mean = encode_latents(vp, vc, decode_latents(vp, vc, mask * encode_latents(
            vp, vc, x[i:i + 1])))
        assert np.abs(np.asarray(decode_latents(vp, vc, mean))[0] - rec["masked"][i]).max() \
            > 1e-4   # not the posterior mean


# ----------------------------------------------------------------------------- concept-query


def _concept_run(root, pipe_dir, latent_pipe):
    """A Concept-TRAK run directory as ``concept-query`` reads it (config.json, data/train.npz,
    record/ with the pipeline's UNet as its only checkpoint), on the tiny latent pipeline."""
    from jaxattrib.config import load_config
    from jaxattrib.train.record import TrajectoryRecord
    cfg = load_config("concept_trak:smoke", [f"base_model={pipe_dir}", "attribution.k=32",
                                             "attribution.microbatch=4"])
    run = root / "run"
    (run / "data").mkdir(parents=True)
    (run / "config.json").write_text(cfg.to_json())
    captions = ["a red circle on a black background", "a blue circle on a white background",
                "a red square on a gray background", "a green star on a black background"]
    ids = [f"synthetic/{i:03d}" for i in range(4)]
    np.savez(run / "data" / "train.npz", images=_smooth_images(4, 20),
             captions=np.array(captions), ids=np.array(ids))
    rec = TrajectoryRecord.create(run / "record", {"config": {"mode": "full"}})
    unet = {"unet": latent_pipe.unet_params}
    rec.save(0, {"step": jnp.asarray(0), "params": unet,
                 "opt_state": {"count": jnp.zeros((), jnp.int32)}}, base=unet)
    rec.close()
    return run, cfg, captions, ids


def test_cli_concept_query_on_latent_pipeline_equals_by_hand(tiny_latent_pipeline, latent_pipe,
                                                              tmp_path, monkeypatch):
    from jaxattrib.attribution import concept_trak as ct
    from jaxattrib.models.vae import encode_latents
    run, cfg, captions, ids = _concept_run(tmp_path, tiny_latent_pipeline, latent_pipe)
    query = _smooth_images(1, 21)
    _write_pngs(tmp_path / "q", query)
    q_png = tmp_path / "q" / "00.png"
    prompt = "a red circle on a black background"
    seen = {}
    real = ct.attribute_concepts

    def spy(unet_config, unet_params, encode, train_images, *args, **kwargs):
        seen["train"], seen["query"] = np.asarray(train_images), np.asarray(args[1])
        seen["out"] = real(unet_config, unet_params, encode, train_images, *args, **kwargs)
        return seen["out"]
    monkeypatch.setattr(ct, "attribute_concepts", spy)
    r = _cli(["concept-query", str(run), "--prompt", prompt, "--concept", "red",
              "--concept", "circle", "--image", str(q_png), "--topk", "4"])
    assert r.exit_code == 0, r.output
    assert ("query image as model input: VAE latents [8, 8, 4]: the VAE posterior mean, "
            "encoded once") in r.output
    got = {}
    concept = None
    for line in r.output.splitlines():
        if line.startswith("concept "):
            concept = line.split("'")[1]
            got[concept] = {}
        elif concept and line.strip()[:1].isdigit():
            rank, score, id_ = line.split()[:3]
            got[concept][id_] = float(score)
    assert list(got) == ["red", "circle"]
    assert all(sorted(v) == sorted(ids) for v in got.values())     # a ranking [N] per concept
    # by hand: every image VAE-encoded once (posterior mean); the inversion and the gradients
    # got exactly those latents
    vp, vc = latent_pipe.vae_params, latent_pipe.vae_config
    train = np.load(run / "data" / "train.npz")["images"]
    z_tr = np.concatenate([np.asarray(encode_latents(vp, vc, train[i:i + 1]))
                           for i in range(4)])
    x_q = np.asarray(Image.open(q_png), np.float32)[None] / 127.5 - 1.0
    z_q = np.asarray(encode_latents(vp, vc, x_q))[0]
    np.testing.assert_allclose(seen["train"], z_tr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seen["query"], z_q, rtol=1e-5, atol=1e-6)
    qs, s = seen["out"]
    assert [q.concept for q in qs] == ["red", "circle"]
    assert s.shape == (2, 4) and np.isfinite(s).all() and not np.allclose(s[0], s[1])
    for row, c in zip(s, ("red", "circle")):   # what is printed is that computation
        np.testing.assert_allclose([got[c][i] for i in ids], row, rtol=1e-3,
                                   atol=1e-4 * np.abs(row).max())
    # a query image of the wrong size: one line naming --image and both shapes, exit 2
    _write_pngs(tmp_path / "big", _smooth_images(1, 22, size=32))
    r = _cli(["concept-query", str(run), "--prompt", prompt, "--concept", "red",
              "--image", str(tmp_path / "big" / "00.png")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert [ln for ln in r.output.splitlines() if ln.strip()] == [
        "error: --image: got images of shape [1, 32, 32, 3]; the model expects pixel images "
        "[N, 16, 16, 3] (UNet sample_size 8 x VAE factor 2)"]


# ----------------------------------------------------------------------------- source-model


@pytest.mark.parametrize("strategy", ["detection", "generation"])
def test_cli_source_model_on_latent_pipeline(tiny_latent_pipeline, finetuned, strategy,
                                            tmp_path):
    from jaxattrib.authentication import source_model as sm
    innocent = perturbed_copy(tiny_latent_pipeline, tmp_path, seed=2, name="innocent")
    run = tmp_path / "run"
    r = _cli(["source-model", "source_model", "--run-dir", str(run), "--no-progress",
              "--set", f"model.pipeline={tiny_latent_pipeline}",
              "--set", f"model.suspects=('{finetuned}',)",
              "--set", f"model.innocent=('{innocent}',)",
              "--set", f"model.reference={innocent}",
              "--set", f"key_samples.strategy={strategy}",
              "--set", "key_samples.prompts=('a red circle', 'a blue square', 'a green star')",
              "--set", "key_samples.n=2", "--set", "key_samples.detection_seeds=2",
              "--set", "key_samples.generation_seeds=(0, 1)",
              "--set", "query.seeds=(0, 1)", "--set", "query.num_inference_steps=2",
              "--set", "report_keys=2"])
    assert r.exit_code == 0, r.output
    res = json.loads((run / "source_model" / "results.json").read_text())
    assert res["compared"] == ("pixels [16, 16, 3]: generated as latents [8, 8, 4] and "
                               "VAE-decoded before any distance")
    keys = res["key_samples"]
    assert keys["strategy"] == strategy and len(keys["prompts"]) == 2
    if strategy == "detection":   # Wen et al.'s signal on latent-shaped noise: finite, distinct
        sig = np.asarray(keys["candidate_scores"]["memorization"])
        assert sig.shape == (3,) and np.isfinite(sig).all() and np.ptp(sig) > 0
    else:
        assert np.isfinite(keys["candidate_scores"]["idiosyncrasy"]).all()
    src = np.load(run / "source_model" / "gen_source_0.npz")["images"]
    sus = np.load(run / "source_model" / "gen_suspect_0.npz")["images"]
    assert src.shape == sus.shape == (2, 2, SIZE, SIZE, 3)    # [seeds, keys] decoded pixels
    # the decision is the hit rate of the distances between the cached decoded pixels
    d = np.asarray(sm.instance_distances(src, sus, "rmse"))
    rows = {row["role"]: row for row in res["models"]}
    assert np.isfinite([row["conf"] for row in res["models"]]).all()
    np.testing.assert_allclose(rows["suspect"]["mean distance"], d.mean(), rtol=1e-5)
    assert rows["suspect"]["conf"] == pytest.approx(float(np.mean(d < res["delta0"])))
    assert isinstance(rows["suspect"]["flagged"], bool)
    assert np.isfinite(res["threshold"]) and 0.0 <= res["threshold"] <= 1.0 + 1e-9
    assert (run / "report.html").is_file() and (run / "results" / "source_model_keys.png").is_file()
    assert f"{'TRAINED ON SOURCE OUTPUTS' if rows['suspect']['flagged'] else 'not flagged'}" \
        in r.output


# ----------------------------------------------------------------------------- MONTRAGE


def test_montrage_on_latents_finds_the_copied_training_image(latent_pipe, tmp_path):
    """Ground truth by construction: each query is a training image's latent plus a little
    noise; MONTRAGE (representations of the latent UNet along a two-checkpoint record) ranks
    that training image first. Pixels are refused (one line)."""
    from jaxattrib.attribution import montrage as M
    from jaxattrib.train.record import TrajectoryRecord
    u = latent_pipe.unet_config
    pixels = _smooth_images(6, 30)
    z = latent_io.pipeline_inputs(latent_pipe, pixels, "train", key=jax.random.PRNGKey(5))
    assert z.shape == (6,) + LAT
    src = np.array([4, 1, 2])
    zq = z[src] + 0.05 * np.abs(z).mean() * np.random.default_rng(0).standard_normal(
        (3,) + LAT).astype(np.float32)
    ctx = np.asarray(latent_pipe.encode_prompts(["a red circle"] * 6))
    p0 = latent_pipe.unet_params
    p1 = jax.tree.map(lambda a: a + 0.01 * jnp.sign(a), p0)
    rec = TrajectoryRecord.create(tmp_path / "record", {"config": {"mode": "full"}})
    opt = {"count": jnp.zeros((), jnp.int32)}
    rec.save(0, {"step": jnp.asarray(0), "params": {"unet": p0}, "opt_state": opt},
             base={"unet": p0})
    rec.save(2, {"step": jnp.asarray(2), "params": {"unet": p1}, "opt_state": opt})
    rec.close()
    rec = TrajectoryRecord.open(tmp_path / "record")
    spec = M.RepresentationSpec(batch_size=8)
    traj = M.representation_trajectory(rec, u, z, ctx, zq, ctx[:3], spec=spec, progress=False,
                                       cache_dir=tmp_path / "cache")
    sims = traj.similarities()
    assert sims.shape == (2, 3, 6) and ((sims >= 0) & (sims <= 1)).all()
    scores = M.trajectory_scores(traj, "mean")
    np.testing.assert_array_equal(np.argmax(scores, axis=1), src)
    np.testing.assert_array_equal(np.argmax(sims[-1], axis=1), src)
    # the cache resumes with the same arrays; pixels instead of latents are refused
    again = M.representation_trajectory(rec, u, z, ctx, zq, ctx[:3], spec=spec, progress=False,
                                        cache_dir=tmp_path / "cache").similarities()
    np.testing.assert_array_equal(again, sims)
    with pytest.raises(M.MontrageInputError, match=r"^train images: got shape \[6, 16, 16, 3\]"):
        M.representation_trajectory(rec, u, pixels, ctx, zq, ctx[:3], spec=spec,
                                    progress=False)
    rec.close()
