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

    from jaxattrib.attribution import cgi_dm
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
    j = lambda z: np.asarray(cgi_dm.contrastive_objective(e_pre, e_ft, sched, z, t, noise,  # noqa: E731
                                                          ctx))
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
    from jaxattrib.attribution.cgi_dm import CGIDMConfig, checkerboard_mask
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
