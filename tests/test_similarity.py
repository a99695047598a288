"""Similarity measures: SSIM/PSNR vs scikit-image (or a direct scipy reference), embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxattrib.authentication import similarity as sim
def _pair(seed, shape=(3, 20, 24, 3), lo=-1.0, hi=1.0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(lo, hi, size=shape)
    y = np.clip(x + rng.normal(scale=0.3 * (hi - lo) / 2, size=shape), lo, hi)
    y[0] = x[0]  # identical pair
    return x, y


def _ssim_reference(x, y, data_range):
    """Direct SSIM (Wang et al.): Gaussian σ 1.5 truncated at 3.5σ, population statistics,
    averaged over the interior (border of 5 cropped) and channels; float64."""
    out = []
    for a, b in zip(x, y):
        vals = []
        for c in range(a.shape[-1]):
            f = lambda z: ndimage.gaussian_filter(z, 1.5, truncate=3.5, mode="reflect")  # noqa
            u, v = f(a[..., c]), f(b[..., c])
            vaa, vbb, vab = f(a[..., c] ** 2) - u * u, f(b[..., c] ** 2) - v * v, \
                f(a[..., c] * b[..., c]) - u * v
            c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
            s = ((2 * u * v + c1) * (2 * vab + c2)) / ((u * u + v * v + c1) * (vaa + vbb + c2))
            vals.append(s[5:-5, 5:-5].mean())
        out.append(np.mean(vals))
    return np.array(out)


@pytest.mark.parametrize("lo,hi", [(-1.0, 1.0), (0.0, 1.0)])
def test_ssim_matches_reference(lo, hi):
    x, y = _pair(0, lo=lo, hi=hi)
    dr = hi - lo
    with jax.enable_x64(True):
        got = np.asarray(sim.ssim(jnp.asarray(x), jnp.asarray(y), data_range=dr))
    np.testing.assert_allclose(got, _ssim_reference(x, y, dr), atol=1e-10)
    assert got[0] == pytest.approx(1.0) and (got[1:] < 0.9).all()
    # float32 path
    got32 = np.asarray(sim.ssim(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                                data_range=dr))
    np.testing.assert_allclose(got32, got, atol=2e-5)


def test_ssim_psnr_match_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    x, y = _pair(1)
    with jax.enable_x64(True):
        got = np.asarray(sim.ssim(jnp.asarray(x), jnp.asarray(y)))
        got_p = np.asarray(sim.psnr(jnp.asarray(x[1:]), jnp.asarray(y[1:])))
    ref = [metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=2.0,
                                         channel_axis=-1) for a, b in zip(x, y)]
    np.testing.assert_allclose(got, ref, atol=1e-10)
    ref_p = [metrics.peak_signal_noise_ratio(a, b, data_range=2.0) for a, b in zip(x[1:], y[1:])]
    np.testing.assert_allclose(got_p, ref_p, rtol=1e-12)


def test_psnr_direct_and_errors():
    x, y = _pair(2, shape=(2, 8, 8, 1))
    mse = ((x - y) ** 2).mean(axis=(1, 2, 3))
    got = np.asarray(sim.psnr(jnp.asarray(x), jnp.asarray(y), data_range=2.0))
    assert np.isinf(got[0])
    np.testing.assert_allclose(got[1], 10 * np.log10(4.0 / mse[1]), rtol=1e-5)
    with pytest.raises(sim.SimilarityInputError, match="smaller than the 11-tap window"):
        sim.ssim(jnp.asarray(x), jnp.asarray(y))
    assert np.asarray(sim.ssim(jnp.asarray(x), jnp.asarray(y), win_size=7))[0] == \
        pytest.approx(1.0)
    with pytest.raises(sim.SimilarityInputError, match="equal shape"):
        sim.psnr(jnp.asarray(x), jnp.asarray(y[:1]))


def test_cosine_and_encoder_hook():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    ref = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(np.asarray(sim.cosine_similarity(jnp.asarray(a), jnp.asarray(b))),
                               ref, rtol=1e-5)
    # a NumPy encoder (e.g. a torch CLIP tower at the edge) with a preprocessing step
    w = rng.normal(size=(6 * 6 * 3, 7)).astype(np.float32)
    enc = lambda x: np.asarray(x).reshape(len(x), -1) @ w  # noqa: E731
    embed = sim.encoder_embedding_fn(enc, preprocess=lambda x: x[:, ::2, ::2])
    x = jnp.asarray(rng.uniform(-1, 1, size=(3, 12, 12, 3)), jnp.float32)
    e = np.asarray(embed(x))
    feats = np.asarray(x)[:, ::2, ::2].reshape(3, -1) @ w
    np.testing.assert_allclose(e, feats / np.linalg.norm(feats, axis=1, keepdims=True),
                               rtol=1e-4, atol=1e-6)
    s = np.asarray(sim.get_similarity("embedding", embed=embed)(x, x[::-1]))
    np.testing.assert_allclose(s[1], 1.0, rtol=1e-5)
    assert s[0] < 0.99
    with pytest.raises(ValueError, match="embed function"):
        sim.get_similarity("embedding")


def test_tap_embedding_from_tiny_unet():
    from jaxattrib.diffusion.schedule import add_noise, make_schedule
    from jaxattrib.models.unet import UNet2DConditionModel, init_params, tiny_config

    cfg = tiny_config(block_out_channels=(8,), norm_num_groups=4, cross_attention_dim=8,
                      in_channels=3, out_channels=3)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    apply = UNet2DConditionModel(cfg).apply
    sched = make_schedule(1000)
    cond = jax.random.normal(jax.random.PRNGKey(1), (1, 2, 8))
    x = jax.random.uniform(jax.random.PRNGKey(2), (3, 8, 8, 3), minval=-1, maxval=1)
    embed = sim.tap_embedding_fn(apply, params, cond=cond, taps=("down_0", "mid", "up_0"),
                                 t=50, sched=sched, noise_seed=3)
    e = np.asarray(embed(x))
    assert e.shape == (3, 8 + 8 + 8)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    # direct computation from the sown intermediates
    noise = jax.random.normal(jax.random.PRNGKey(3), (8, 8, 3))
    tt = jnp.full((3,), 50)
    z_t = add_noise(sched, x, jnp.broadcast_to(noise, x.shape), tt)
    run = jax.jit(lambda p, z, t, c: apply({"params": p}, z, t, c, mutable=["intermediates"]))
    _, st = run(params, z_t, tt, jnp.broadcast_to(cond, (3, 2, 8)))
    it = st["intermediates"]
    f = np.concatenate([np.asarray(it[k][0]).mean(axis=(1, 2)) for k in ("down_0", "mid", "up_0")],
                       axis=1)
    np.testing.assert_allclose(e, f / np.linalg.norm(f, axis=1, keepdims=True), atol=1e-5)
    # an image's embedding does not depend on its batch
    np.testing.assert_allclose(np.asarray(embed(x[::-1])), e[::-1], atol=1e-5)
    with pytest.raises(KeyError, match="down_7"):
        sim.tap_embedding_fn(apply, params, cond=cond, taps=("down_7",))(x)


@pytest.mark.parametrize("kind", ["clip", "dino"])
def test_hf_image_encoder_from_local_folder(tmp_path, kind):
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, image_size=16, patch_size=8)
    if kind == "clip":
        model = transformers.CLIPVisionModelWithProjection(
            transformers.CLIPVisionConfig(projection_dim=8, **common))
        mean, std = sim.CLIP_MEAN, sim.CLIP_STD
    else:
        model = transformers.ViTModel(transformers.ViTConfig(**common), add_pooling_layer=False)
        mean, std = sim.IMAGENET_MEAN, sim.IMAGENET_STD
    model.eval().save_pretrained(tmp_path)
    embed = sim.hf_image_encoder(str(tmp_path), batch_size=2)
    x = np.random.default_rng(0).uniform(-1, 1, size=(3, 16, 16, 3)).astype(np.float32)
    e = np.asarray(embed(jnp.asarray(x)))
    pix = torch.from_numpy(((((x + 1) / 2) - np.float32(mean)) / np.float32(std))
                           .transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        out = model(pixel_values=pix)
    ref = (out.image_embeds if kind == "clip" else out.last_hidden_state[:, 0]).numpy()
    np.testing.assert_allclose(e, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    # larger inputs are resized to the model's size
    assert np.asarray(embed(jnp.zeros((1, 24, 24, 3)))).shape == e[:1].shape
